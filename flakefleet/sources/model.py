"""What a source is: the declared types and fields, and the errors a bad one raises."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

TYPES = ("file", "git", "symlink", "pipe", "derivation")
FIELDS: dict[str, tuple[str, ...]] = {
    "file": ("type", "path", "include", "exclude", "checksum", "build"),
    "git": ("type", "url", "ref", "submodules"),
    "symlink": ("type", "target"),
    "pipe": ("type", "command", "mode"),
    "derivation": ("type", "expression", "flake"),
}
BUILD_FIELDS = ("inputs", "command", "output")
# A source name is one plain file name in /var/src: no '/', no leading '.', no '..'.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_+][A-Za-z0-9._+-]*\Z")
# The flake, synced as `config` for every machine (krops' layout), without its VCS metadata
# and `nix build` result links.
CONFIG = "config"
CONFIG_EXCLUDES = ("/.git", "/result")
# Where the controller keeps its state for sources, under the repository (git-ignored).
STATE_DIR = ".flakefleet"
# Files in a git checkout all get this modification time, so trees of two commits share
# every unchanged file (rsync hard-links it) and only content decides what is sent.
GIT_MTIME = 1
KEEP_BUILDS = 2  # successful builds kept per machine and source (the newest)
MANIFESTS = "manifests"  # under STATE_DIR: each tree digested, by digest (for the plan)
MANIFEST_DAYS = 90  # a manifest no run digested for this long is forgotten
PRUNE_AFTER = 24 * 3600  # seconds an unused git checkout or pipe output is kept


class SourceError(ValueError):
    """A source that cannot be deployed; the message is one line naming where it comes from."""

    def __init__(
        self,
        machine: str,
        name: str | None,
        origin: str,
        problem: str,
        field_name: str | None = None,
    ) -> None:
        self.machine = machine
        self.problem = problem
        where = f"{origin}, field {field_name!r}" if field_name else origin
        what = f"source {name!r}" if name is not None else "sources"
        self.detail = f"{what} ({where}): {problem}"
        super().__init__(f"{machine}: {self.detail}")


class SourcesInvalid(ValueError):
    """Bad source declarations on one or more machines; `lines` has one line per problem."""

    def __init__(self, errors: Sequence[SourceError]) -> None:
        self.errors = list(errors)
        machines: dict[str, list[str]] = {}
        for error in errors:  # the same problem on many machines is one line
            machines.setdefault(error.detail, []).append(error.machine)
        self.lines = sorted(f"{', '.join(sorted(names))}: {d}" for d, names in machines.items())
        super().__init__("; ".join(self.lines))


class BuildError(RuntimeError):
    """A build stage that failed; the message ends with the build's last lines of output,
    `output` has all of it."""

    def __init__(self, message: str, output: str) -> None:
        self.output = output
        super().__init__(message)


@dataclass(frozen=True)
class Build:
    """The local build stage of a source: copy `inputs` into a fresh build directory (each a
    destination in it and a local path), run `command` there, ship the `output` directory."""

    inputs: tuple[tuple[str, Path], ...]
    command: str
    output: str


@dataclass(frozen=True)
class Source:
    """One declared source of one machine, checked and with `{machine}` filled in."""

    name: str
    type: str
    origin: str
    path: Path | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    only: Path | None = None  # rsync rules naming the only files sent (the flake's, in git)
    checksum: bool = False
    build: Build | None = None
    url: str = ""
    ref: str = ""
    submodules: bool = False
    target: str = ""
    command: str = ""
    mode: int = 0o644
    expression: str = ""
    flake: str = ""
