#!/bin/sh
# Imitation of nix-darwin's `activate-user` before 25.05 (modules/system/activation-scripts.nix,
# `userScript`), run as the user by darwin-rebuild before `activate`: the system checks (it
# stops after them when `checkActivation=1`), then the user's defaults and launchd agents,
# here one file in the user's home naming the system.
set -eu
PATH=/usr/bin:/bin:/usr/sbin:/sbin
systemConfig=@out@

echo "checking the system..."
[ -e "$systemConfig/etc/fleet-release" ] || { echo "error: no fleet-release" >&2; exit 2; }
if [ "${checkActivation:-0}" -eq 1 ]; then
  echo "ok" >&2
  exit 0
fi

echo "setting up user defaults..."
printf '%s %s\n' "$(id -un)" "$systemConfig" > "$HOME/.fleet-user-activation"
