#!/bin/sh
# Imitation of nix-darwin's activation script for @name@, run as root (darwin-rebuild runs it
# with HOME=/var/root): checks, /etc, then make this generation the running system. It does not
# rely on the caller's PATH, as a non-interactive SSH session on macOS has no Nix in it.
# As upstream's (modules/system/activation-scripts.nix, modules/system/checks.nix), it stops
# after its checks when `checkActivation=1` (`darwin-rebuild check`). A generation from before
# nix-darwin 25.05 (@legacy@ set) has its checks in `activate-user` instead, run as the user
# first, and an `activate` that knows no checkActivation.
set -eu
PATH=/usr/bin:/bin:/usr/sbin:/sbin
systemConfig=@out@

if [ "$(id -u)" != 0 ]; then
  echo "activate: error: nix-darwin activation must run as root" >&2
  exit 2
fi

if [ -z "@legacy@" ]; then
  echo "checking the system..."  # system.checks
  [ -e "$systemConfig/etc/fleet-release" ] || { echo "error: no fleet-release" >&2; exit 2; }
  if [ "${checkActivation:-0}" -eq 1 ]; then
    echo "ok" >&2
    exit 0
  fi
fi

echo "setting up /etc..."
ln -sfn "$systemConfig/etc" /etc/static.new && mv -T /etc/static.new /etc/static
ln -sfn /etc/static/fleet-release /etc/fleet-release

echo "setting up launchd services..."
ln -sfn "$systemConfig" /run/current-system.new && mv -T /run/current-system.new /run/current-system
mkdir -p /var/log
echo "$(date -u +%FT%TZ) activated $systemConfig" >> /var/log/activations.log

if [ -n "@failActivation@" ]; then
  echo "activate: error: launchctl bootstrap failed (failActivation is set for @name@)" >&2
  exit 4
fi
