#!/bin/sh
# Imitation of a NixOS activation script for @name@: make this generation the running system,
# link its /etc files, and start, restart or stop services to match it. Exits non-zero on failure.
set -eu
# Its own PATH, as NixOS's activation script sets one from its activation path (never the
# caller's: under systemd-run that is only systemd's bin directory).
export PATH=/usr/bin:/usr/sbin
system=@out@
mode=${1:-activate}   # "activate", or "dry-activate" to only say what would change
run=/run/services
# With systemd as PID 1 the role services are units, which switch-to-configuration starts;
# without it (a namespace machine) this script starts them as processes.
[ -d /run/systemd/system ] && systemd=1 || systemd=""

say() { echo "activate: $*"; }

# --- services: compare what runs (/run/services/<name>.unit) with what this system declares
running_units() { for f in "$run"/*.unit; do [ -e "$f" ] && basename "$f" .unit; done; return 0; }
alive() { [ -f "$run/$1.pid" ] && kill -0 "$(cat "$run/$1.pid")" 2>/dev/null; }

stop_service() {
  if alive "$1"; then
    pid=$(cat "$run/$1.pid"); kill "$pid" 2>/dev/null || true
    i=0; while kill -0 "$pid" 2>/dev/null && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
  fi
  rm -f "$run/$1.pid" "$run/$1.unit"
}

start_service() {
  # fd 9 is switch-to-configuration's lock: a service must not hold it after the switch.
  setsid "$system/services/$1" </dev/null >>"/var/log/$1.log" 2>&1 9>&- &
  echo $! > "$run/$1.pid"
  echo "$system/services/$1" > "$run/$1.unit"
  sleep 0.3
  alive "$1" || { say "error: service $1 failed to start (see /var/log/$1.log)"; return 1; }
}

plan() {
  for name in $(running_units); do
    [ -e "$system/services/$name" ] || echo "stop $name"
  done
  for unit in "$system"/services/*; do
    [ -e "$unit" ] || continue
    name=$(basename "$unit")
    if ! alive "$name"; then echo "start $name"
    elif [ "$(cat "$run/$name.unit")" != "$unit" ]; then echo "restart $name"
    fi
  done
}

if [ "$mode" = dry-activate ]; then
  say "would activate $system"
  [ -n "$systemd" ] || plan | sed 's/^/would /'
  exit 0
fi

mkdir -p "$run" /var/log /var/lib
ln -sfn "$system" /run/current-system.new && mv -T /run/current-system.new /run/current-system

# users.users: NixOS creates the system's accounts during activation, before its services
# start (update-users-groups.pl, run by the activation script's `users` snippet).
for user in @users@; do
  grep -q "^$user:" /etc/passwd || /usr/sbin/useradd --system --no-create-home --user-group \
    --shell /usr/sbin/nologin "$user" || { say "error: cannot create user $user"; exit 4; }
done

# /run/keys: NixOS mounts a ramfs there at boot, 0750 root:keys (tasks/filesystems.nix:
# boot.specialFileSystems and its tmpfiles rule); services read their keys through group keys.
grep -q "^keys:" /etc/group || /usr/sbin/groupadd --system keys
[ -d /run/keys ] || install -d -m 0750 -g keys /run/keys

# /etc: /etc/static points at this generation; managed files link through it.
ln -sfn "$system/etc" /etc/static.new && mv -T /etc/static.new /etc/static
for f in fleet-release motd; do ln -sfn "/etc/static/$f" "/etc/$f"; done

# sshd is part of the system: a generation with breakSsh makes it refuse every new login (fault
# tests; not by moving it to another port, which another fleet on this computer may use); any
# other generation puts the testbed's own configuration back.
sshd_config=/etc/ssh/testbed/sshd_config
if [ -f "$sshd_config" ]; then
  if [ -n "@breakSsh@" ] && [ ! -e "$sshd_config.orig" ]; then
    cp "$sshd_config" "$sshd_config.orig"
    echo 'DenyUsers *' >> "$sshd_config"
    kill -HUP "$(cat /run/sshd.pid)"
    say "sshd refuses new logins"
  elif [ -z "@breakSsh@" ] && [ -e "$sshd_config.orig" ]; then
    mv "$sshd_config.orig" "$sshd_config"
    kill -HUP "$(cat /run/sshd.pid)"
    say "sshd configuration restored"
  fi
fi

# The generation's units, linked through /etc/static as NixOS links /etc/systemd/system: unit
# files and drop-ins (multi-user.target.wants stays in the generation: what it wants, the
# switch and the boot start). Links into /etc/static that this generation lacks go.
if [ -n "$systemd" ]; then
  units=/etc/systemd/system
  find "$units" -type l -lname '/etc/static/*' ! -exec test -e {} \; -delete
  for file in /etc/static/systemd/system/*.service /etc/static/systemd/system/*.service.d/*.conf; do
    [ -e "$file" ] || continue
    link=$units/${file#/etc/static/systemd/system/}
    mkdir -p "$(dirname "$link")"
    ln -sfn "$file" "$link"
  done
  find "$units" -mindepth 1 -type d -name '*.service.d' -empty -delete
fi

failed=0
[ -n "$systemd" ] || plan | while read -r action name; do
  case $action in
    stop) say "stopping $name"; stop_service "$name" ;;
    start) say "starting $name"; start_service "$name" ;;
    restart) say "restarting $name"; stop_service "$name"; start_service "$name" ;;
  esac
done || failed=1

echo "$(date -u +%FT%TZ) activated $system" >> /var/log/activations.log

# A slow activation, for tests that act while one is under way.
[ -z "@activationDelay@" ] || sleep "@activationDelay@"

# Fault injection on the machine itself: while this file exists every activation fails, the
# previous system's too (to test a rollback that fails).
if [ -e /run/fail-every-activation ]; then
  say "error: /run/fail-every-activation exists"
  exit 4
fi
if [ -n "@failActivation@" ]; then
  say "error: unit fleet-check.service failed (failActivation is set for @name@)"
  exit 4
fi
[ "$failed" = 0 ] || exit 4
