"""What a sync would change in a machine's /var/src, for the plan: from digests only.

Nothing is copied and no command runs: a source is new, changed, removed or unchanged by its
digest against the one the machine's link names; a changed file tree's files are listed
from the two trees' manifests when this controller digested the old one too. A pipe's command
and an uncached build are not run, so their change is unknown.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from flakefleet.models import VarSrc
from flakefleet.sources.run import MachineSources, Ready

Manifest = Mapping[str, str]  # entry -> fingerprint (flakefleet.sources.digests)
SHOWN = 5  # file names listed per kind of change; the rest are counted


def describe(
    wanted: MachineSources, var_src: VarSrc, manifest: Callable[[str], Manifest | None]
) -> list[str]:
    """One phrase per source a sync would change, e.g. ``config: 1 changed (flake.nix)``."""
    phrases = []
    # A derivation's digest covers the other sources': unknown if one of theirs is.
    unknown = any(i.digest is None for i in wanted.sources if i.source.type != "derivation")
    for item in wanted.finalize({}):
        name, digest = item.source.name, item.digest
        if item.source.type == "derivation" and unknown:
            digest = None
        current = var_src.sources.get(name, "absent")
        if digest is None:
            phrases.append(f"{name}: {_unknown(item)}")
        elif current == "absent":
            phrases.append(f"{name}: new")
        elif current is None:
            phrases.append(f"{name}: would replace an entry flakefleet did not make")
        elif current != digest:
            phrases.append(f"{name}: {_files(manifest(current), manifest(digest))}")
    declared = {item.source.name for item in wanted.sources}
    if not wanted.keep_undeclared:
        phrases += [
            f"{name}: removed (no longer declared)"
            for name, digest in sorted(var_src.sources.items())
            if digest is not None and name not in declared
        ]
    return phrases


def _unknown(item: Ready) -> str:
    if item.source.type == "pipe":
        return "unknown (its command runs only in a deploy)"
    if item.stage is not None:
        return "unknown (its build runs only in a deploy)"
    return "unknown (it depends on a source whose change is unknown)"


def _files(old: Manifest | None, new: Manifest | None) -> str:
    if old is None or new is None:
        return "changed"
    # Files and links; a directory shows through the files in it.
    added = sorted(entry for entry in set(new) - set(old) if not new[entry].startswith("D"))
    removed = sorted(entry for entry in set(old) - set(new) if not old[entry].startswith("D"))
    changed = sorted(entry for entry in set(old) & set(new) if old[entry] != new[entry])
    parts = [
        f"{len(entries)} {kind} ({_names(entries)})"
        for kind, entries in (("changed", changed), ("added", added), ("removed", removed))
        if entries
    ]
    return ", ".join(parts) or "changed (the same files)"


def _names(entries: Sequence[str]) -> str:
    shown = ", ".join(entry or "(the file)" for entry in entries[:SHOWN])
    return shown + (f", and {len(entries) - SHOWN} more" if len(entries) > SHOWN else "")
