#!/bin/sh
# Imitation of home-manager's activation script for @user@, run as that user: make this
# generation the user's home-manager profile (unless it already is), keep a GC root link to
# it, and link its home-files into $HOME, replacing links an older generation made.
set -eu
PATH=/usr/bin:/bin:/nix/var/nix/profiles/default/bin
generation=@out@
profile=/nix/var/nix/profiles/per-user/$(id -un)/home-manager
state=$HOME/.local/state/home-manager

if [ "$(id -un)" != "@user@" ]; then
  echo "activate: error: this generation is for @user@, not $(id -un)" >&2
  exit 1
fi

# Like home-manager's linkGeneration: a new profile generation only if the profile is elsewhere.
if [ "$(readlink -f "$profile" 2>/dev/null || true)" != "$generation" ]; then
  echo "Creating profile generation"
  nix-env --profile "$profile" --set "$generation"
fi
mkdir -p "$state/gcroots"
ln -sfn "$generation" "$state/gcroots/current-home"

# Like linkNewGen: every file of home-files becomes a link in $HOME.
cd "$generation/home-files"
find . -type f | while read -r file; do
  target=$HOME/${file#./}
  mkdir -p "$(dirname "$target")"
  ln -sfn "$generation/home-files/${file#./}" "$target"
done
echo "$(date -u +%FT%TZ) activated $generation" >> "$state/activations.log"

if [ -n "@failActivation@" ]; then
  echo "activate: error: a home-manager activation step failed (failActivation is set)" >&2
  exit 4
fi
