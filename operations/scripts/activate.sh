# flakefleet's remote half of an activation, run as `sh -s -- GOAL SYSTEM [PROFILE]`.
# Sets the profile (switch, boot), runs the system's switch-to-configuration, and when that
# fails puts the machine back on what it ran before: profile and activation both, and the
# failed generation is deleted. The last line on stderr says what happened.
set -u
goal=$1
system=$2
profile=${3:-/nix/var/nix/profiles/system}

say() { echo "flakefleet: $*" >&2; }

running=$(readlink /run/current-system 2>/dev/null || true)
previous_generation=$(readlink "$profile" 2>/dev/null || true)   # e.g. system-4-link

case $goal in
  switch | boot)
    nix-env -p "$profile" --set "$system" || { say "could not set $profile to $system"; exit 1; } ;;
esac

"$system/bin/switch-to-configuration" "$goal" && exit 0
status=$?
say "switch-to-configuration $goal failed with exit status $status"

case $goal in
  switch | boot)
    new_generation=$(readlink "$profile")
    if [ -z "$previous_generation" ] || [ "$new_generation" = "$previous_generation" ]; then
      say "activation failed (exit $status); no previous generation to roll back to"
      exit 2
    fi
    number=${new_generation#*-}
    number=${number%-link}
    nix-env -p "$profile" --rollback >/dev/null 2>&1 \
      && nix-env -p "$profile" --delete-generations "$number" >/dev/null 2>&1 \
      || { say "ROLLBACK FAILED: could not restore $profile to $previous_generation"; exit 3; }
    restore=$(readlink -f "$profile") ;;
  test) restore=$running ;;
  *) say "dry activation failed (exit $status); nothing was changed"; exit 2 ;;
esac

if [ -z "$restore" ]; then
  say "activation failed (exit $status); nothing ran before, nothing to roll back to"
  exit 2
fi
if "$restore/bin/switch-to-configuration" "$goal" >&2; then
  say "activation failed (exit $status); rolled back to $restore"
  exit 2
fi
say "ROLLBACK FAILED: activation failed (exit $status) and re-activating $restore failed too"
exit 3
