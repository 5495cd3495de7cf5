#!/bin/sh
# Imitation of home-manager's activation script for @user@, run as that user (upstream:
# modules/home-environment.nix, `activationScript` and the `writeBoundary` entry, and
# modules/lib-bash/activation-init.sh). What it shares with the real one:
# - `--driver-version 1`: the caller (`home-manager switch`, flakefleet) has set the profile
#   already. Without it (driver 0, the default), it sets the profile itself: a new generation
#   unless the one it activated last (gcroots/current-home) is this one. Other options are
#   refused. A legacy generation (@legacy@ set: no `gen-version`, as before home-manager 25.11)
#   takes no options and always sets the profile itself.
# - It runs `nix-env -q` first (Nix 2.14 and later then make ~/.local/state/nix/profiles),
#   moves an old profile (/nix/var/nix/profiles/per-user/$USER/home-manager*) into that
#   directory when it exists and deletes the old links (`migrateProfile`), and keeps the profile
#   there, else in the per-user directory, else fails (`setupVars`).
# - It links home-files into $HOME, then makes this generation the current-home GC root.
set -eu
PATH=/usr/bin:/bin:/nix/var/nix/profiles/default/bin
newGenPath=@out@
driver=0
if [ -z "@legacy@" ]; then
  while [ $# -gt 0 ]; do
    case $1 in
      --driver-version)
        [ $# -ge 2 ] || { echo "$0: no driver version specified" >&2; exit 1; }
        case $2 in
          0 | 1) driver=$2 ;;
          *) echo "$0: unexpected driver version $2" >&2; exit 1 ;;
        esac
        shift 2 ;;
      *) echo "$0: unknown option '$1'" >&2; exit 1 ;;
    esac
  done
fi

user=$(id -un)
if [ "$user" != "@user@" ]; then
  echo "activate: error: USER is \"$user\", expected \"@user@\"" >&2
  exit 1
fi
cd "$HOME"

stateHome=${XDG_STATE_HOME:-$HOME/.local/state}
newProfilesDir=$stateHome/nix/profiles
hmStateDir=$stateHome/home-manager
globalProfilesDir=/nix/var/nix/profiles/per-user/$user

nix-env -q >/dev/null 2>&1 || true

# migrateProfile
oldProfilesDir=''
if [ -e "$globalProfilesDir/home-manager" ]; then
  oldProfilesDir=$globalProfilesDir
elif [ -e "$hmStateDir/profiles/home-manager" ]; then
  oldProfilesDir=$hmStateDir/profiles
fi
if [ -n "$oldProfilesDir" ] && [ -e "$newProfilesDir" ]; then
  if [ ! -e "$newProfilesDir/home-manager" ]; then
    echo "Migrating profile from $oldProfilesDir to $newProfilesDir"
    for p in "$oldProfilesDir"/home-manager-*; do
      nix-store --realise "$p" --add-root "$newProfilesDir/${p##*/}" >/dev/null
    done
    cp -P "$oldProfilesDir/home-manager" "$newProfilesDir"
  fi
  rm "$oldProfilesDir/home-manager" "$oldProfilesDir"/home-manager-*
fi

# setupVars
if [ -d "$newProfilesDir" ]; then
  profilesDir=$newProfilesDir
elif [ -d "$globalProfilesDir" ]; then
  profilesDir=$globalProfilesDir
else
  echo "Could not find suitable profile directory, tried $newProfilesDir and $globalProfilesDir" >&2
  exit 1
fi
genProfilePath=$profilesDir/home-manager
currentGenGcPath=$hmStateDir/gcroots/current-home
oldGenPath=$(readlink -e "$currentGenGcPath" 2>/dev/null || true)

# writeBoundary
if [ "$driver" -lt 1 ]; then
  if [ "$oldGenPath" != "$newGenPath" ]; then
    echo "Creating new profile generation"
    nix-env --profile "$genProfilePath" --set "$newGenPath"
  else
    echo "No change so reusing latest profile generation"
  fi
fi

# Like linkNewGen: every file of home-files becomes a link in $HOME.
cd "$newGenPath/home-files"
find . -type f | while read -r file; do
  target=$HOME/${file#./}
  mkdir -p "$(dirname "$target")"
  ln -sfn "$newGenPath/home-files/${file#./}" "$target"
done

if [ -n "@failActivation@" ]; then
  echo "activate: error: a home-manager activation step failed (failActivation is set)" >&2
  exit 4
fi

# The "current generation" GC root, once every step succeeded.
mkdir -p "$hmStateDir/gcroots"
nix-store --realise "$newGenPath" --add-root "$currentGenGcPath" >/dev/null
echo "$(date -u +%FT%TZ) activated $newGenPath (driver version $driver)" >> "$hmStateDir/activations.log"
