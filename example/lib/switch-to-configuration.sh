#!/bin/sh
# Imitation of NixOS' switch-to-configuration for @name@, with the same goals and exit codes.
set -eu
system=@out@

# The imitation bootloader: the machine boots what this link names (see testbed/machine.py).
install_bootloader() {
  mkdir -p /var/lib/fake-bootloader
  ln -sfn "$system" /var/lib/fake-bootloader/default.new
  mv -T /var/lib/fake-bootloader/default.new /var/lib/fake-bootloader/default
}

case "${1:-}" in
  switch) install_bootloader; exec "$system/activate" ;;
  boot) install_bootloader ;;
  test) exec "$system/activate" ;;
  dry-activate) exec "$system/activate" dry-activate ;;
  *) echo "usage: switch-to-configuration switch|boot|test|dry-activate" >&2; exit 1 ;;
esac
