"""Facts about the sources a machine holds in /var/src (the krops layout)."""

from __future__ import annotations

from pyinfra.api import FactBase

from flakefleet.models import SOURCES_ROOT, STORE_DIR, USER_SOURCES_ROOT, VarSrc


class Sources(FactBase[VarSrc]):
    """The state of /var/src, read in one command (root's /var/src; a login without root uses
    ``~/.var/src``).

    Example output::

        root /var/src
        exists
        managed
        source config .flakefleet/config/3f9c...e1
        source notes
        stored config
        kept config

    ``kept``: a source a generation still runs with (a rollback to it puts it back), so its
    trees are no orphans, even when it is no longer declared.
    """

    @staticmethod
    def default() -> VarSrc:
        return VarSrc()

    def command(self, root: str = "") -> str:
        """`root`: the sources root to read (`Target.sources_root`); by default the one of
        whoever runs it (root's /var/src, else the login's own)."""
        choose = (
            f'r="{root}"'
            if root
            else (f'r={SOURCES_ROOT}; [ "$(id -u)" = 0 ] || r="{USER_SOURCES_ROOT}"')
        )
        return (
            f'{choose}; echo "root $r"; '
            'if [ -d "$r" ]; then echo exists; '
            f'[ -d "$r/{STORE_DIR}" ] && echo managed; '
            '[ -n "$(ls -A "$r")" ] || echo empty; '
            'for f in "$r"/*; do [ -e "$f" ] || [ -L "$f" ] || continue; '
            'printf "source %s %s\\n" "${f##*/}" "$(readlink "$f")"; done; '
            f'for f in "$r/{STORE_DIR}"/*; do [ -d "$f" ] && printf "stored %s\\n" "${{f##*/}}"; '
            f'done; cat "$r/{STORE_DIR}/.generations/"* 2>/dev/null | '
            "awk '{ print \"kept \" $1 }' | sort -u; fi; true"
        )

    def process(self, output: list[str]) -> VarSrc:
        flags = {line.strip() for line in output}
        root = SOURCES_ROOT
        sources: dict[str, str | None] = {}
        live: dict[str, str] = {}
        stored: set[str] = set()
        kept: set[str] = set()
        for line in output:
            kind, _, rest = line.strip().partition(" ")
            if kind == "root" and rest:
                root = rest
            elif kind == "stored" and rest:
                stored.add(rest)
            elif kind == "kept" and rest:
                kept.add(rest)
            elif kind == "source":
                name, _, target = rest.partition(" ")
                tree = _managed_tree(name, target)
                sources[name] = tree.split(".")[0] if tree else None
                if tree:
                    live[name] = tree
        return VarSrc(
            exists="exists" in flags,
            managed="managed" in flags,
            sources=sources,
            root=root,
            empty="empty" in flags,
            live=live,
            stored=frozenset(stored - kept),
        )


def _managed_tree(name: str, target: str) -> str | None:
    """The store directory a /var/src entry links to, if flakefleet made it
    (``.flakefleet/<name>/<tree>``)."""
    parts = target.split("/")
    if len(parts) == 3 and parts[0] == STORE_DIR and parts[1] == name and parts[2]:
        return parts[2]
    return None
