"""Content digests of local trees and sources: whether a source changed is decided on the
controller, without walking the machine's copy."""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path

from flakefleet.process import run
from flakefleet.sources.model import Source


def list_tree(
    path: Path,
    include: Sequence[str],
    exclude: Sequence[str],
    empty: Path,
    only: Path | None = None,
) -> list[str]:
    """The relative paths rsync sends from `path` with these filters ('' for a single file).

    rsync itself lists them (a dry run into an empty directory), so the digest covers exactly
    what the sync sends, whatever the filter rules mean.
    """
    if not path.is_dir():
        return [""]
    argv = ["rsync", "--archive", "--dry-run", "--8-bit-output", "--out-format=%n"]
    argv += filter_options(include, exclude, only)
    listed = run([*argv, f"{path}/", f"{empty}/"]).stdout
    names = (_unescape(line).rstrip("/") for line in listed.splitlines())
    return sorted(name for name in names if name not in ("", "."))


def filter_options(
    include: Sequence[str], exclude: Sequence[str], only: Path | None = None
) -> list[str]:
    """rsync filter options: includes first, then excludes (rsync's first match wins); with
    `only`, a file of rules (`only_rules`) naming the only files to send."""
    options = [*(f"--include={p}" for p in include), *(f"--exclude={p}" for p in exclude)]
    if only is not None:  # directories left with none of those files are not sent
        options += [f"--filter=merge {only}", "--prune-empty-dirs"]
    return options


def only_rules(files: Sequence[str]) -> str:
    """rsync filter rules that let through exactly `files` (paths relative to the tree).

    Every directory is let in so rsync descends to the files (`--prune-empty-dirs` drops
    those left empty); a name with a wildcard character has each one escaped, as rsync
    reads a backslash only in patterns that have one.
    """
    lines = []
    for name in files:
        if "\n" in name:  # a rule is one line; such a name cannot be listed
            continue
        if any(char in name for char in "*?["):
            name = re.sub(r"([*?\[\\])", r"\\\1", name)
        lines.append(f"+ /{name}")
    return "\n".join([*lines, "+ */", "- *", ""])


def _unescape(name: str) -> str:
    return re.sub(r"\\#([0-7]{3})", lambda match: chr(int(match.group(1), 8)), name)


def tree_digest(path: Path, entries: Sequence[str], checksum: bool) -> str:
    """A sha256 over the listed entries' fingerprints (`fingerprints`). Two trees with the same
    digest sync to the same copy."""
    return digest_of(fingerprints(path, entries, checksum))


def digest_of(found: Sequence[tuple[str, str]]) -> str:
    """A tree's digest from its entries' fingerprints."""
    digest = hashlib.sha256()
    for _entry, fingerprint in found:
        digest.update(fingerprint.encode() + b"\0")
    return digest.hexdigest()


def fingerprints(path: Path, entries: Sequence[str], checksum: bool) -> list[tuple[str, str]]:
    """Each listed entry and what the sync compares of it: type, permissions, link target,
    and the file's content (`checksum`) or its size and modification time (rsync's quick
    check, to the nanosecond)."""
    found = []
    for entry in entries:
        full = path / entry if entry else path
        info = full.lstat() if entry else full.stat()
        head = f"{stat.S_IMODE(info.st_mode):o}\0{entry}"
        if stat.S_ISLNK(info.st_mode):
            found.append((entry, f"L{head}\0{os.readlink(full)}"))
        elif stat.S_ISDIR(info.st_mode):
            found.append((entry, f"D{head}"))
        elif stat.S_ISREG(info.st_mode):
            what = file_sha256(full) if checksum else f"{info.st_size}:{info.st_mtime_ns}"
            found.append((entry, f"F{head}\0{what}"))
        else:
            found.append((entry, f"S{head}"))
    return found


def file_sha256(path: Path) -> str:
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def source_digest(source: Source, content: str) -> str:
    """The digest of a source: its type, the options that shape its copy, and its content."""
    options = [source.type, *source.include, "\0", *source.exclude, str(source.checksum)]
    if source.type == "git":
        options = [source.type, source.url, str(source.submodules)]
    if source.type == "pipe":
        options = [source.type, f"{source.mode:o}"]
    return hashlib.sha256("\0".join([*options, content]).encode()).hexdigest()


def derivation_digest(source: Source, others: Sequence[tuple[str, str]]) -> str:
    text = source.expression or source.flake
    kind = "expression" if source.expression else "flake"
    return source_digest(source, "\0".join([kind, text, *(f"{n}={d}" for n, d in others)]))
