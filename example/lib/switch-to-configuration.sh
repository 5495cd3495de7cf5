#!/bin/sh
# Imitation of NixOS' switch-to-configuration for @name@, with the same goals, lock and exit
# statuses as nixpkgs' switch-to-configuration-ng:
#   - every goal first takes /run/nixos/switch-to-configuration.lock with a non-blocking
#     exclusive flock; if another switch holds it: "Could not acquire lock", exit 11 (upstream
#     dies with errno, EWOULDBLOCK);
#   - switch and boot install the bootloader (its menu lists every generation of the system
#     profile at that moment), then boot stops there;
#   - a new init incompatible with the running one (init-interface-version differs): a warning,
#     exit 100, nothing activated (the boot entry is already set);
#   - activation failing: the activation script's status (the imitation's is 4, as upstream's
#     "units failed").
set -eu
system=@out@
profile=/nix/var/nix/profiles/system
boot=/var/lib/fake-bootloader

# The imitation bootloader: the machine boots what `default` names (see testbed/machine.py);
# `entries` is its menu, "<generation> <system>" per generation of the profile, as GRUB or
# systemd-boot write one entry per generation each time the bootloader is installed.
install_bootloader() {
  mkdir -p "$boot"
  for link in "$profile"-*-link; do
    [ -L "$link" ] || continue
    number=${link%-link}
    printf '%s %s\n' "${number##*-}" "$(readlink -f "$link")"
  done | sort -n > "$boot/entries.new"
  mv "$boot/entries.new" "$boot/entries"
  ln -sfn "$system" "$boot/default.new"
  mv -T "$boot/default.new" "$boot/default"
}

case "${1:-}" in
  switch | boot | test | dry-activate) ;;
  *) echo "usage: switch-to-configuration switch|boot|test|dry-activate" >&2; exit 1 ;;
esac

mkdir -p /run/nixos
exec 9>>/run/nixos/switch-to-configuration.lock
flock -n 9 || { echo "Could not acquire lock" >&2; exit 11; }

case $1 in switch | boot) install_bootloader ;; esac
[ "$1" = boot ] && exit 0

# The running system's interface; generations older than this knob have none (compatible).
running=$(cat /run/current-system/init-interface-version 2>/dev/null || cat "$system/init-interface-version")
if [ "$running" != "$(cat "$system/init-interface-version")" ]; then
  echo "Warning: the new NixOS configuration has an 'init' that is" >&2
  echo "incompatible with the current configuration.  The new configuration" >&2
  echo "won't take effect until you reboot the system." >&2
  exit 100
fi

case $1 in
  switch | test) exec "$system/activate" ;;
  dry-activate) exec "$system/activate" dry-activate ;;
esac
