"""Content digests of local trees: whether a source changed, decided without the network."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path

# Never part of a source: version-control metadata and `nix build` result links.
DEFAULT_EXCLUDES = (".git", "result")


def tree_digest(root: Path, excludes: Iterable[str] = DEFAULT_EXCLUDES) -> str:
    """A sha256 over the tree's paths, types, executable bits, contents and link targets.

    Two trees with the same digest sync to identical copies (rsync -a keeps exactly these).
    Top-level entries named in `excludes` are left out, as the sync leaves them out.
    """
    excluded = set(excludes)
    digest = hashlib.sha256()
    if root.is_file():
        return _file_sha256(root)
    for directory, dirs, files in os.walk(root):
        relative_dir = Path(directory).relative_to(root)
        if relative_dir == Path("."):
            dirs[:] = [d for d in dirs if d not in excluded]
            files = [f for f in files if f not in excluded]
        dirs.sort()
        for name in sorted([*files, *(d for d in dirs if (Path(directory) / d).is_symlink())]):
            path = Path(directory) / name
            info = path.lstat()
            entry = (relative_dir / name).as_posix().encode()
            if stat.S_ISLNK(info.st_mode):
                digest.update(b"L" + entry + b"\0" + os.readlink(path).encode() + b"\0")
            elif stat.S_ISREG(info.st_mode):
                executable = b"x" if info.st_mode & 0o111 else b"-"
                digest.update(b"F" + executable + entry + b"\0" + _file_sha256(path).encode())
        for name in dirs:
            if not (Path(directory) / name).is_symlink():
                digest.update(b"D" + (relative_dir / name).as_posix().encode() + b"\0")
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()
