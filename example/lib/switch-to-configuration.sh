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
# On a machine with systemd as PID 1 it also manages the generation's units (etc/systemd/system)
# as upstream's does (main.rs, do_system_switch): units the new generation drops are stopped
# before activation, changed ones stopped then started after it (restarted in one go if they say
# X-StopIfChanged=false, as NixOS's sshd does), new ones started; failed units are reset, systemd
# reloads its units, and a unit failed at the end makes it exit 4 ("the following units
# failed"). dry-activate says what it would stop, restart and start.
set -eu
# Its own PATH, as upstream's wrapper gives it one: never the caller's.
export PATH=/usr/bin:/usr/sbin
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

if [ ! -d /run/systemd/system ]; then  # no systemd (sd_booted): the activation starts services
  case $1 in
    switch | test) exec "$system/activate" ;;
    dry-activate) exec "$system/activate" dry-activate ;;
  esac
fi

# --- systemd: the units the running generation's /etc (/etc/static) and the new one define
units=systemd/system
old_etc=$(readlink -f /etc/static 2>/dev/null || true)
new_etc=$(readlink -f "$system/etc")

unit_names() {  # fleet-web.service, and ssh.service for a drop-in (ssh.service.d)
  for etc in "$old_etc" "$new_etc"; do
    [ -n "$etc" ] && [ -d "$etc/$units" ] || continue
    for file in "$etc/$units"/*.service "$etc/$units"/*.service.d; do
      [ -e "$file" ] && basename "$file" .d
    done
  done | sort -u
}
unit_text() {  # a unit as systemd merges it: its file, then its drop-ins
  [ -n "$1" ] || return 0
  cat "$1/$units/$2" "$1/$units/$2.d"/*.conf 2>/dev/null || true
}

stop="" start="" restart=""
for unit in $(unit_names); do
  if systemctl is-active --quiet "$unit"; then
    if [ -n "$old_etc" ] && [ -e "$old_etc/$units/$unit" ] && [ ! -e "$new_etc/$units/$unit" ]; then
      stop="$stop $unit"  # gone from the configuration
    elif [ "$(unit_text "$old_etc" "$unit")" != "$(unit_text "$new_etc" "$unit")" ]; then
      if { unit_text "$old_etc" "$unit"; unit_text "$new_etc" "$unit"; } | grep -qx 'X-StopIfChanged=false'; then
        restart="$restart $unit"
      else
        stop="$stop $unit" start="$start $unit"
      fi
    fi
  elif [ -e "$new_etc/$units/multi-user.target.wants/$unit" ]; then
    start="$start $unit"  # new, or not running (failed)
  fi
done

# Upstream's list: sorted case-insensitively, joined with ", " ("a.service, b.service").
listed() {
  printf '%s\n' $1 | sort -f | sed ':a;N;$!ba;s/\n/, /g'
}

if [ "$1" = dry-activate ]; then
  [ -z "$stop" ] || echo "would stop the following units: $(listed "$stop")" >&2
  echo "would activate the configuration..." >&2
  "$system/activate" dry-activate || true
  [ -z "$restart" ] || echo "would restart the following units: $(listed "$restart")" >&2
  [ -z "$start" ] || echo "would start the following units: $(listed "$start")" >&2
  exit 0
fi

if [ -n "$stop" ]; then
  echo "stopping the following units:$stop" >&2
  systemctl stop $stop || true
fi
status=0
echo "activating the configuration..." >&2
"$system/activate" || status=$?
systemctl reset-failed  # forget about previously failed units
systemctl daemon-reload
if [ -n "$restart" ]; then
  echo "restarting the following units:$restart" >&2
  systemctl restart $restart || status=4
fi
if [ -n "$start" ]; then
  echo "starting the following units:$start" >&2
  systemctl start $start || status=4
fi
sleep 0.25  # let units that fail at once be seen failing, as upstream waits for systemd to settle
failed=$(systemctl list-units --state=failed --no-legend --plain | awk '{print $1}' | xargs)
if [ -n "$failed" ]; then
  echo "warning: the following units failed: $failed" >&2
  systemctl status --no-pager --full $failed >&2 || true
  [ "$status" != 0 ] || status=4
fi
exit $status
