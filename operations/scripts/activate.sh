# flakefleet's activation worker: the remote half of an activation, started detached on the
# machine so that a dropped SSH connection cannot kill it halfway (the protocol, its phases and
# its files are described once, in flakefleet/worker.py):
#
#   sh activate.sh --dir DIR --class CLASS --goal GOAL --system SYSTEM --profile PROFILE
#                  --running LINK --confirm-timeout SECONDS [--user USER] [--generation N]
#                  [--sources ROOT] [--sources-undo FILE] [--record FILE --record-base JSON]
#
# USER is the SSH user, as whom a nix-darwin generation's legacy `activate-user` runs.
#
# LINK links to what the machine runs (/run/current-system; a home-manager machine runs what
# its profile selects). ROOT is the sources root (/var/src): a generation this worker makes
# remembers the trees it runs with there (ROOT/.flakefleet/.generations/N), so a later
# rollback to it can put them back. FILE is what this deploy's sync replaced in ROOT ("NAME
# TREE" per line, "-" for absent): a rollback puts those links back too, so the old system
# does not run on the new sources.
#
# With --generation (a rollback), the profile is switched to that existing generation, SYSTEM,
# instead of gaining a new one, ROOT is put back as that generation had it (where it was
# remembered), and a failure switches both back without deleting anything.
#
# With --record, the outcome is appended to FILE (the machine's deploy history, one JSON
# object a line): time, outcome, message, goal, system, generation, sources, and the
# deployer's JSON fields (who, from which revision).
#
# It sets the profile (switch, boot), activates SYSTEM the way its class does, and then, when
# the confirmation timeout is > 0, waits that long for DIR/confirm, made by the deployer over a
# new SSH connection after its checks pass (DIR/hold, made the same way, starts the wait
# again). Without it (the machine became unreachable), or
# with DIR/abort (the checks failed), and whenever activation fails, it puts the machine back
# on what it ran before: profile and activation both, deleting the new generation.
#
# Progress is in DIR/phase (running, awaiting-confirmation, succeeded, failed, rolled-back,
# rollback-failed) with one line in DIR/message; everything it prints goes to DIR/log.
set -u
usage() {
  echo "usage: activate.sh --dir DIR --class CLASS --goal GOAL --system SYSTEM" \
    "--profile PROFILE --running LINK --confirm-timeout SECONDS [--user USER] [--generation N]" \
    "[--sources ROOT] [--sources-undo FILE] [--record FILE --record-base JSON]" >&2
  exit 2
}
dir='' class='' goal='' system='' profile='' running_link='' confirm_timeout='' user=''
generation='' sources_root='' sources_undo='' record='' record_base=''
while [ $# -gt 0 ]; do
  [ $# -ge 2 ] || usage
  case $1 in
    --dir) dir=$2 ;;
    --class) class=$2 ;;
    --goal) goal=$2 ;;
    --system) system=$2 ;;
    --profile) profile=$2 ;;
    --running) running_link=$2 ;;
    --confirm-timeout) confirm_timeout=$2 ;;
    --user) user=$2 ;;
    --generation) generation=$2 ;;
    --sources) sources_root=$2 ;;
    --sources-undo) sources_undo=$2 ;;
    --record) record=$2 ;;
    --record-base) record_base=$2 ;;
    *) usage ;;
  esac
  shift 2
done
for value in "$dir" "$class" "$goal" "$system" "$profile" "$running_link" "$confirm_timeout"; do
  [ -n "$value" ] || usage
done
case $record in "~/"*) record="$HOME/${record#"~/"}" ;; esac
exec >>"$dir/log" 2>&1 </dev/null

phase() {
  case $1 in running | awaiting-confirmation) ;; *) remember_generation "$1"; record "$1" "$2" ;; esac
  printf '%s\n' "$2" >"$dir/message.new" && mv "$dir/message.new" "$dir/message"
  printf '%s\n' "$1" >"$dir/phase.new" && mv "$dir/phase.new" "$dir/phase"
  echo "flakefleet: $1: $2"
}

# The generation the profile selects, when this worker made it (or switched to it) and kept
# it; empty otherwise (a test, a failure: the profile is as it was).
kept_generation() {  # OUTCOME
  [ "$1" = succeeded ] && [ -n "$profile_set" ] || return 0
  number=$(readlink "$profile" 2>/dev/null) || return 0
  number=${number%-link}
  number=${number##*-}
  case $number in '' | *[!0-9]*) ;; *) printf '%s' "$number" ;; esac
}

# The live sources, "NAME TREE" a line (only the links into flakefleet's store).
live_sources() {
  for link in "$sources_root"/*; do
    tree=$(readlink "$link" 2>/dev/null) || continue
    case $tree in
      .flakefleet/*/*) tree=${tree#.flakefleet/}; printf '%s %s\n' "${tree%%/*}" "${tree#*/}" ;;
    esac
  done
}

# Remember the trees a kept generation runs with (the sync keeps them while the generation
# exists), and forget those of generations deleted since.
remember_generation() {  # OUTCOME
  [ -n "$sources_root" ] || return 0
  kept=$(kept_generation "$1")
  [ -n "$kept" ] || return 0
  generations="$sources_root/.flakefleet/.generations"
  mkdir -p "$generations" &&
    live_sources >"$generations/.new" && mv "$generations/.new" "$generations/$kept"
  for file in "$generations"/*; do
    number=${file##*/}
    [ -e "$profile-$number-link" ] || [ -L "$profile-$number-link" ] || rm -f "$file"
  done
}

# A JSON string: backslashes and quotes escaped, control characters dropped.
json_string() {
  printf '"%s"' "$(printf '%s' "$1" | tr -d '\000-\037' | sed 's/\\/\\\\/g; s/"/\\"/g')"
}

# Append the outcome to the machine's deploy history (readable by its owner only).
record() {  # OUTCOME MESSAGE
  [ -n "$record" ] || return 0
  kept=$(kept_generation "$1")
  sources=''
  if [ -n "$sources_root" ]; then
    sources=$(live_sources | while read -r name tree; do printf ',"%s":"%s"' "$name" "$tree"; done)
  fi
  (
    umask 077
    mkdir -p "${record%/*}" &&
      printf '{"time":"%s","outcome":"%s","message":%s,"goal":"%s","system":"%s","generation":%s,"sources":{%s}%s}\n' \
        "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$1" "$(json_string "$2")" "$goal" "$system" \
        "${kept:-null}" "${sources#,}" "${record_base:+,$record_base}" >>"$record"
  ) || echo "flakefleet: could not append to $record"
}

# What the machine runs now (nothing, if the link does not exist: readlink -f would print it).
running() {
  if [ -e "$running_link" ]; then readlink -f "$running_link"; fi
}

# Make a system live the way its class does. home-manager's as its own tool does it
# (home-manager/home-manager, doSwitch): the profile set first, then `activate --driver-version
# 1`, which leaves the profile alone (without it, the activation sets the profile itself).
activate() {  # SYSTEM GOAL
  case $class in
    nixos) "$1/bin/switch-to-configuration" "$2" ;;
    darwin) darwin_activate "$1" "$2" ;;
    home) "$1/activate" --driver-version 1 ;;  # as the user, the profile already set
    *) echo "unknown machine class $class"; return 1 ;;
  esac
}

# nix-darwin as darwin-rebuild does it (pkgs/nix-tools/darwin-rebuild.sh): `activate` as root
# with HOME=/var/root, after a legacy `activate-user` as the user (a generation from before
# nix-darwin 25.05: its activate-user is not marked `# nix-darwin: deprecated`). nix-darwin has no
# dry-activate: as `darwin-rebuild check`, it exports checkActivation=1, with which either
# script stops after its checks, and runs only activate-user where there is one (before 25.05
# the checks were there, and `activate` knew no checkActivation).
darwin_activate() {  # SYSTEM GOAL
  check=0
  [ "$2" = dry-activate ] && check=1
  if [ -x "$1/activate-user" ] && ! grep -q '^# nix-darwin: deprecated$' "$1/activate-user"; then
    as_user env checkActivation=$check "$1/activate-user" || return
    [ $check = 0 ] || return 0
  fi
  checkActivation=$check HOME=/var/root "$1/activate"
}
as_user() {
  if [ -z "$user" ] || [ "$(id -un)" = "$user" ]; then "$@"; else sudo -u "$user" -H -- "$@"; fi
}

# switch-to-configuration's own lock (nixpkgs' switch-to-configuration-ng takes it with a
# non-blocking flock; when it cannot: "Could not acquire lock", exit 11). Held, it means
# another switch (an auto-upgrade, a hand-run nixos-rebuild) is under way: what it does to
# the machine is its own, so nothing is activated or rolled back over it.
switch_lock=/run/nixos/switch-to-configuration.lock
another_switch() {
  [ "$class" = nixos ] && [ -e "$switch_lock" ] && command -v flock >/dev/null 2>&1 \
    && ! flock -n "$switch_lock" true
}

# With a confirmation to wait for, a NixOS switch runs the new system with `test` first and
# makes it the profile's generation and the boot default only once confirmed: a machine that
# loses power before then boots what it ran before (nixos-rebuild writes the boot entry first).
deferred=''
if [ "$class" = nixos ] && [ "$goal" = switch ] && [ "$confirm_timeout" -gt 0 ]; then
  deferred=1
fi
profile_set=''

# Make SYSTEM the profile's selected generation (a new one, or --generation's).
set_profile() {
  if [ -n "$generation" ]; then
    nix-env -p "$profile" --switch-generation "$generation"
  else
    nix-env -p "$profile" --set "$system"
  fi || return 1
  profile_set=1
}

# Put back what ran before, then stop with the reason. With PROFILE_ONLY, only the profile is
# put back (nothing was activated).
roll_back() {  # REASON [PROFILE_ONLY]
  restore_goal=$goal
  if [ -n "$profile_set" ]; then
    new_generation=$(readlink "$profile")
    if [ -z "$previous_generation" ] || [ "$new_generation" = "$previous_generation" ]; then
      phase failed "$1; no previous generation to roll back to"
      exit 1
    fi
    # Back to the generation selected before (not `--rollback`: after an earlier rollback, the
    # one below the new generation is not it), then the new one is deleted (unless it was an
    # existing one: --generation).
    number=${previous_generation%-link}
    new_number=${new_generation%-link}
    nix-env -p "$profile" --switch-generation "${number##*-}" &&
      if [ -z "$generation" ]; then
        nix-env -p "$profile" --delete-generations "${new_number##*-}"
      fi
    if [ $? -ne 0 ]; then
      phase rollback-failed "$1; could not restore $profile to $previous_generation"
      exit 1
    fi
    restore=$(readlink -f "$profile")
  else
    # The profile and the boot default were never touched: only what runs goes back.
    restore=$previously_running
    [ -n "$deferred" ] && restore_goal=test
  fi
  if [ -n "${2:-}" ]; then
    phase failed "$1; nothing was activated, $profile left on ${restore:-what it was}"
  elif [ -z "$restore" ]; then
    phase failed "$1; nothing ran before, nothing to roll back to"
  elif restore_sources && activate "$restore" "$restore_goal"; then
    phase rolled-back "$1; rolled back to $restore$restored"
  else
    phase rollback-failed "$1; re-activating $restore failed too"
  fi
  exit 1
}

# Put /var/src back as it was before this deploy's sync (its old trees are kept for this).
restore_sources() {
  [ -n "$sources_undo" ] && [ -f "$sources_undo" ] && [ -n "$sources_root" ] || return 0
  set_sources <"$sources_undo"
  rm -f "$sources_undo"
  restored=" and its sources"
}
restored=''

# Point ROOT's links at the trees read, "NAME TREE" a line ("-": no such source); a tree no
# longer kept leaves its link as it is.
set_sources() {
  if mv --version >/dev/null 2>&1; then mvt="mv -T"; else mvt="mv -h"; fi
  while read -r name tree; do
    if [ "$tree" = - ]; then
      rm -f "$sources_root/$name"
    elif [ -e "$sources_root/.flakefleet/$name/$tree" ] || [ -L "$sources_root/.flakefleet/$name/$tree" ]; then
      ln -sfn ".flakefleet/$name/$tree" "$sources_root/.$name.flakefleet-new" &&
        $mvt "$sources_root/.$name.flakefleet-new" "$sources_root/$name"
    fi
  done
}

# A rollback to a generation: ROOT as that generation had it, what it replaces written to the
# undo file first (a failed rollback puts it back). Says how it went in `moved_sources`.
sources_of_generation() {
  moved_sources=''
  [ -n "$generation" ] && [ -n "$sources_root" ] && [ -n "$sources_undo" ] || return 0
  wanted="$sources_root/.flakefleet/.generations/$generation"
  if [ ! -f "$wanted" ]; then
    moved_sources=" ($sources_root as it was: generation $generation's sources were not recorded)"
    return 0
  fi
  mkdir -p "${sources_undo%/*}"
  {
    live_sources
    while read -r name tree; do
      [ -L "$sources_root/$name" ] || printf '%s -\n' "$name"
    done <"$wanted"
  } >"$sources_undo"
  live_sources | while read -r name tree; do
    awk -v n="$name" '$1 == n { found = 1 } END { exit !found }' "$wanted" ||
      printf '%s -\n' "$name"
  done | set_sources
  set_sources <"$wanted"
  moved_sources=" with the sources it was deployed with"
}
moved_sources=''

# Once confirmed (or right away without a deferred boot): the profile and the boot default.
make_boot_default() {
  set_profile || roll_back "could not set $profile to $system"
  activate "$system" boot || roll_back "making $system the boot default failed"
}

# A home-manager generation from before home-manager 25.11 (no gen-version) sets the profile
# itself whatever it is told: `home-manager switch` only activates it, and so does this.
self_profiled() {
  [ "$class" = home ] && [ -z "$generation" ] && [ ! -e "$system/gen-version" ]
}

# A home-manager profile left where Nix before 2.14 kept it moves into the directory the profile
# is in now (~/.local/state/nix/profiles), as home-manager's activation moves it
# (modules/lib-bash/activation-init.sh, migrateProfile), but before the profile is set: the
# activation would find the new profile already set and only delete the old links, and with
# them the generations to roll back to.
migrate_home_profile() {
  new=$(dirname "$profile")
  old=/nix/var/nix/profiles/per-user/$(id -un)
  [ -e "$old/home-manager" ] || old=${XDG_STATE_HOME:-$HOME/.local/state}/home-manager/profiles
  [ "$old" != "$new" ] && [ -e "$old/home-manager" ] && [ -d "$new" ] || return 0
  if [ ! -e "$new/home-manager" ]; then
    echo "moving the home-manager profile from $old to $new"
    for p in "$old"/home-manager-*; do
      nix-store --realise "$p" --add-root "$new/${p##*/}" >/dev/null || return 1
    done
    cp -P "$old/home-manager" "$new/" || return 1
  fi
  rm -f "$old/home-manager" "$old"/home-manager-*
}

echo $$ >"$dir/pid"  # before the first phase: the deployer tells a live worker from a dead one
if [ "$class" = home ] && ! migrate_home_profile; then
  phase failed "could not move the old home-manager profile into $(dirname "$profile")"
  exit 1
fi
previously_running=$(running)
previous_generation=$(readlink "$profile" 2>/dev/null || true)
phase running "activating $system ($goal)"
if another_switch; then
  phase failed "another switch-to-configuration is running (it holds $switch_lock); nothing changed"
  exit 1
fi

case $goal in
  switch | boot)
    [ -n "$deferred" ] || self_profiled || set_profile ||
      { phase failed "could not set $profile to $system"; exit 1; } ;;
esac

sources_of_generation
if [ -n "$deferred" ]; then activate "$system" test; else activate "$system" "$goal"; fi
status=$?
# What such a generation made of the profile is undone like ours.
if self_profiled && [ "$(readlink "$profile" 2>/dev/null)" != "$previous_generation" ]; then
  profile_set=1
fi
[ "$goal" = dry-activate ] && { phase succeeded "dry activation (exit $status)"; exit 0; }
# Taken between our check and the switch: only our profile change is undone.
if [ $status -eq 11 ] && grep -q "Could not acquire lock" "$dir/log"; then
  roll_back "another switch-to-configuration is running (it holds $switch_lock)" profile-only
fi
# 100: the new init is incompatible with the running one; the profile and boot entry are set
# and the new system runs from the next boot (upstream's meaning; nothing to roll back).
if [ $status -eq 100 ] && [ "$goal" = switch ]; then
  [ -n "$deferred" ] && make_boot_default
  phase succeeded "activated for next boot; reboot required (its init is incompatible with the running one: exit 100)"
  exit 0
fi
[ $status -eq 0 ] || roll_back "activation failed (exit $status)"

if [ "$confirm_timeout" -gt 0 ]; then
  phase awaiting-confirmation "activated $system; waiting ${confirm_timeout}s for confirmation"
  ticks=0
  while [ ! -e "$dir/confirm" ] && [ ! -e "$dir/abort" ] && [ $ticks -lt $((confirm_timeout * 10)) ]
  do
    # DIR/hold, made over a new SSH login while the deployer waits on slower machines before
    # its checks can begin: the window starts again now.
    if [ -e "$dir/hold" ]; then rm -f "$dir/hold"; ticks=0; fi
    sleep 0.1
    ticks=$((ticks + 1))
  done
  if [ -e "$dir/confirm" ]; then
    [ -n "$deferred" ] && make_boot_default
    phase succeeded "activated $system, confirmed$moved_sources"
    exit 0
  fi
  [ -e "$dir/abort" ] && roll_back "$(cat "$dir/abort")"
  roll_back "not confirmed within ${confirm_timeout}s (no new SSH connection could confirm it)"
fi
phase succeeded "activated $system$moved_sources"
