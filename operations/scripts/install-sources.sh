# The shell functions of flakefleet's sources install (operations/sources.py `install_script`):
# the install commands of one sync follow them in the same POSIX sh script (GNU or BSD tools),
# with `r` (the sources root, /var/src) and `store` (flakefleet's directory in it) set first,
# and `undo` (a file) when what the sync replaces must be remembered for a rollback.
set -e
s="$r/$store"
mkdir -p "$s"
cd "$r"  # a derivation's flake may be a source: ./name
if mv --version >/dev/null 2>&1; then mvt="mv -T"; else mvt="mv -h"; fi
remember() {  # how /var/src/$1 was before this sync ("-": absent), for a rollback to put back
  [ -n "${undo:-}" ] || return 0
  was=$(readlink "$r/$1" 2>/dev/null) && was=${was##*/} || was=-
  printf '%s %s\n' "$1" "$was" >> "$undo"
}
live() {  # make tree $2 the live /var/src/$1 with one rename; keep the tree it replaces (a
          # rollback puts it back) and drop the source's others
  remember "$1"
  ln -sfn "$store/$1/$2" "$r/.$1.flakefleet-new"
  $mvt "$r/.$1.flakefleet-new" "$r/$1"
  drop "$1" "$2" "$was"
}
drop() {  # remove source $1's trees but those named after it and those a generation still
          # runs with (.generations/N, written by the activation worker; see activate.sh)
  name=$1; shift
  kept=$(cat "$s/.generations/"* 2>/dev/null | awk -v n="$name" '$1 == n { print $2 }')
  for tree in "$s/$name"/* "$s/$name"/.[!.]*; do
    [ -e "$tree" ] || [ -L "$tree" ] || continue
    base=${tree##*/}
    case " $* " in *" $base "*) continue ;; esac
    printf '%s\n' "$kept" | grep -qxF -- "$base" || rm -rf "$tree"
  done
  rmdir "$s/$name" 2>/dev/null || true
}
unlink() {  # /var/src/$1 is no longer declared: its tree stays until the next sync
  remember "$1"
  rm -f "$r/$1"
}
flake() {  # Nix wants a path flake's directory itself, not /var/src's link to it
  case "$1" in
    path:*|/*|./*)
      ref=${1#path:}; dir=${ref%%[#?]*}
      printf 'path:%s%s' "$(readlink -f "$dir")" "${ref#"$dir"}" ;;
    *) printf '%s' "$1" ;;
  esac
}
realise() {  # source name, then a Nix command; on failure, say which source and why
  name=$1; shift
  if ! log=$("$@" 2>&1); then
    printf '%s\n' "$log" >&2
    why=$(printf '%s\n' "$log" | grep -m1 'error' || printf '%s\n' "$log" | tail -n1)
    echo "source '$name': $1 failed: $why" >&2
    exit 1
  fi
}