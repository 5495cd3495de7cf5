"""Facts about the sources a machine holds in /var/src (the krops layout)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pyinfra.api import FactBase

SOURCES_ROOT = "/var/src"
# flakefleet's own directory in /var/src: its presence is the marker that flakefleet manages
# this /var/src, and it holds every source's trees, one per content digest.
STORE_DIR = ".flakefleet"


@dataclass(frozen=True)
class VarSrc:
    """What /var/src holds: whether flakefleet manages it, and each source's content digest
    (None for an entry flakefleet did not put there)."""

    exists: bool = False
    managed: bool = False
    sources: dict[str, str | None] = field(default_factory=dict)


class Sources(FactBase[VarSrc]):
    """The state of /var/src, read in one command.

    Example output::

        exists
        managed
        source config .flakefleet/config/3f9c...e1
        source notes
    """

    @staticmethod
    def default() -> VarSrc:
        return VarSrc()

    def command(self) -> str:
        return (
            f"if [ -d {SOURCES_ROOT} ]; then echo exists; "
            f"[ -d {SOURCES_ROOT}/{STORE_DIR} ] && echo managed; "
            f'for f in {SOURCES_ROOT}/*; do [ -e "$f" ] || [ -L "$f" ] || continue; '
            'printf "source %s %s\\n" "${f##*/}" "$(readlink "$f")"; done; fi; true'
        )

    def process(self, output: list[str]) -> VarSrc:
        flags = {line.strip() for line in output}
        sources: dict[str, str | None] = {}
        for line in output:
            kind, _, rest = line.strip().partition(" ")
            if kind != "source":
                continue
            name, _, target = rest.partition(" ")
            parts = target.split("/")
            managed = len(parts) == 3 and parts[0] == STORE_DIR and parts[1] == name
            sources[name] = parts[2] if managed else None
        return VarSrc(exists="exists" in flags, managed="managed" in flags, sources=sources)
