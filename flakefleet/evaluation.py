"""Evaluating machines' systems: bounded chunks, parallel workers, and none for what is unchanged.

A real NixOS machine costs seconds of CPU and about 600 MiB to evaluate, and memory adds up
within one `nix eval` (each machine instantiates its own nixpkgs). So each `nix eval` takes at
most `eval_chunk` machines and at most `eval_workers` run side by side: the controller's peak
memory is bounded by the workers times the chunk whatever the fleet's size, and the wall time
is the machines' evaluation time divided by the workers. A machine's system is there as soon as its
chunk has it; an error fails only the machine Nix was evaluating (its chunk's others are
evaluated again without it).

Builds and copies of early machines do not start while later ones still evaluate: pyinfra
runs every machine's deploy file (where each machine waits for its own system, to decide
whether it needs a build) before it executes any operation, and a build started from a deploy
file would run under --dry and before the user has confirmed the changes.

The cache (`.flakefleet/evaluations/`) keeps each machine's system with what it depends on,
and a machine whose dependencies did not change is not evaluated again:

- the controller's Nix settings and version, the flake's reference and lock file, the input
  overrides (only pinned ones: an override of a local checkout is evaluated every time), the
  Nix options and the machine's attribute;
- the flake's files the machine's evaluation read, as Nix took them (git: the tracked files'
  contents, uncommitted changes included): Nix checks every source file an evaluation reads,
  imports, lists, copies or tests for (pure evaluation allows nothing else), and says so at
  -vvv; a machine is charged with every check made up to the end of its evaluation in its
  process (it may reuse values computed before it), and for a directory with everything in it;
- the whole flake, and its git revision, when the machine's evaluation may have seen them: its
  derivations refer to the flake's own store path (`self`, `${self}`), or a flake file it read
  names the revision or source attributes (`rev`, `lastModified`, `narHash`, `outPath`, ...).

A system whose derivation left the store is evaluated again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from flakefleet import nix
from flakefleet.files import write_atomically
from flakefleet.process import CommandError
from flakefleet.sources.digests import file_sha256

CACHE = ".flakefleet/evaluations"
CACHE_FORMAT = "1"
# What a real NixOS machine's evaluation takes (about 600 MiB), with room to spare.
MEMORY_PER_MACHINE = 1 << 30
# A flake file naming these may let a machine see the flake's revision or its whole source.
SOURCE_INFO = re.compile(
    rb"\b(rev|shortRev|dirtyRev|dirtyShortRev|revCount|lastModified|lastModifiedDate|narHash"
    rb"|sourceInfo|outPath)\b"
)
# An override whose reference names a commit or a content hash: what it gives cannot change.
PINNED = re.compile(r"[?&](rev|narHash)=|(^|[/:])[0-9a-f]{40}($|[/?&])")


def default_workers(chunk: int = 1) -> int:
    """As many workers as the controller has cores, and memory for (`MEMORY_PER_MACHINE` for
    each machine of a chunk).

    Example: on 2 cores with 23 GiB available, ``default_workers() == 2``.
    """
    available = _available_memory()
    fit = available // (MEMORY_PER_MACHINE * chunk) if available else os.cpu_count() or 1
    return max(1, min(os.cpu_count() or 1, fit))


def _available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclass
class Workers:
    """A run's evaluation workers: at most `count` `nix eval` at once, whatever their flakes;
    `evaluated` lists the machines Nix evaluated in this run, in order (the cache's others)."""

    count: int
    chunk: int = 1
    slots: threading.BoundedSemaphore = field(init=False)
    evaluated: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    said: set[str] = field(default_factory=set)  # Nix's warnings, each shown once

    def __post_init__(self) -> None:
        self.slots = threading.BoundedSemaphore(self.count)


class Evaluation:
    """The systems of machines that share a flake and Nix settings (a batch of a run)."""

    def __init__(
        self,
        flake: nix.Flake,
        options: nix.Options,
        attributes: Mapping[str, nix.Attributes],
        workers: Workers,
        cache: Path | None = None,
    ) -> None:
        self.flake = flake
        self.options = options
        self.attributes = dict(attributes)
        self.workers = workers
        self.systems: dict[str, nix.System] = {}  # as they arrive
        self.errors: dict[str, str] = {}
        self._done = {name: threading.Event() for name in attributes}
        self._queue: list[dict[str, nix.Attributes]] = []
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._left = set(attributes)
        self._reported = False
        self._cache = Cache(cache, flake, options) if cache is not None else None

    def start(self) -> Evaluation:
        """Take what the cache has, and start the workers on the rest."""
        missing: dict[str, dict[str, nix.Attributes]] = {}
        for name, attribute in self.attributes.items():
            system = self._cache.reuse(attribute) if self._cache else None
            if system is not None:
                self.workers.reused.append(name)
                self._publish(name, system)
            else:  # a machine's alternatives share an output
                missing.setdefault(attribute[0][0], {})[name] = attribute
        for group in missing.values():
            names = list(group)
            for first in range(0, len(names), self.workers.chunk):
                self._queue.append({n: group[n] for n in names[first : first + self.workers.chunk]})
        for _ in range(min(self.workers.count, len(self._queue))):
            threading.Thread(target=self._work, daemon=True).start()
        return self

    def result(self, name: str) -> nix.System:
        """The machine's system, once its chunk is evaluated; NixError if it did not."""
        self._done[name].wait()
        if name in self.errors:
            raise nix.NixError(self.errors[name])
        return self.systems[name]

    def wait(self) -> None:
        for done in self._done.values():
            done.wait()

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    return
                chunk = self._queue.pop(0)
            with self.workers.slots:
                try:
                    self._evaluate(chunk)
                except Exception as error:  # whatever it was, no machine waits for ever
                    for name in chunk:
                        if not self._done[name].is_set():
                            self._fail(name, f"evaluation failed: {error!r}")

    def _evaluate(self, chunk: dict[str, nix.Attributes]) -> None:
        """Evaluate a chunk; when Nix fails on a machine, that machine fails and the others
        are evaluated again without it."""
        before = self._cache.before() if self._cache else None
        while chunk:
            try:
                traced = nix.evaluate_traced(self.flake, chunk, self.options)
            except (nix.NixError, OSError) as error:  # e.g. a Nix option's command failed
                traced = nix.Traced(error=str(error))
            for warning in set(traced.warnings) - self.workers.said:
                self.workers.said.add(warning)
                print(warning, file=sys.stderr)
            if traced.error is None:
                self.workers.evaluated.extend(traced.systems)
                if self._cache and before is not None:
                    self._cache.keep(chunk, traced, before)
                for name, system in traced.systems.items():
                    self._publish(name, system)
                return
            failed = [traced.failed] if traced.failed in chunk else list(chunk)
            for name in failed:
                self.workers.evaluated.append(name)
                attribute = nix.describe_attribute(chunk.pop(name))
                self._fail(name, f"evaluation of {attribute} failed: {traced.error}")

    def _publish(self, name: str, system: nix.System) -> None:
        with self._lock:
            self.systems[name] = system
        self._settled(name)

    def _fail(self, name: str, reason: str) -> None:
        print(f"flakefleet: {name}: {reason}", file=sys.stderr)
        with self._lock:
            self.errors[name] = reason
        self._settled(name)

    def _settled(self, name: str) -> None:
        """The machine's result is in; the batch's line first if it was the last."""
        with self._lock:
            self._left.discard(name)
            last = not self._left and not self._reported
            self._reported = self._reported or last
        if last:
            self._finished()
        self._done[name].set()

    def _finished(self) -> None:
        """One line when the batch is done: how many machines Nix evaluated, and in how long."""
        seconds = time.monotonic() - self._started
        names = set(self.attributes)
        evaluated = [n for n in self.workers.evaluated if n in names]
        reused = len(names) - len(evaluated)
        print(
            f"flakefleet: evaluated {len(evaluated)} of {len(names)} machines of "
            f"{self.flake.path} in {seconds:.1f} s ({self.workers.count} workers, "
            f"{self.workers.chunk} a chunk), {reused} unchanged since their last evaluation",
            file=sys.stderr,
        )


def evaluate_systems(
    flake: nix.Flake | Path,
    attributes: Mapping[str, nix.Attributes],
    options: nix.Options,
    workers: Workers | None = None,
) -> dict[str, nix.System]:
    """The systems of the machines that evaluate (no cache). Example:
    ``evaluate_systems(Path("example"), {"web1": nix.configuration_attribute("nixos",
    "web1", "root")}, {})["web1"].out``; a single machine that fails raises NixError."""
    flake = flake if isinstance(flake, nix.Flake) else nix.Flake(flake)
    evaluation = Evaluation(flake, options, attributes, workers or Workers(default_workers()))
    evaluation.start().wait()
    if len(attributes) == 1 and evaluation.errors:
        raise nix.NixError(next(iter(evaluation.errors.values())))
    return evaluation.systems


# -- the cache -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Before:
    """What an evaluation may see of the whole flake, read before it starts (a change made while
    Nix evaluates then makes the record miss, never hit)."""

    whole: str  # the revision and every file Nix takes


class Cache:
    """The evaluation records of one flake and Nix settings, under `.flakefleet/evaluations/`."""

    def __init__(self, directory: Path, flake: nix.Flake, options: nix.Options) -> None:
        self.directory = directory
        self.flake = flake
        self.options = options
        self.root, files = nix.flake_source(flake.path)
        self.relative = flake.path.resolve().relative_to(self.root).as_posix()
        self.view = Tree(self.root, files)
        self.usable = all(PINNED.search(ref) for _name, ref in flake.overrides)
        self._base: str | None = None
        self._whole: str | None = None

    def base(self, attribute: nix.Attributes) -> str:
        """The digest of everything but the flake's files that decides the machine's system."""
        if self._base is None:
            lock = self.flake.path / "flake.lock"
            commands = sorted(
                (name, value.command)
                for name, value in self.options.items()
                if isinstance(value, nix.FromCommand)
            )
            self._base = _digest(
                CACHE_FORMAT,
                nix.settings_text(self.options),
                self.flake.reference,
                lock.read_bytes().hex() if lock.exists() else "no lock file",
                json.dumps(self.flake.overrides),
                json.dumps(nix.option_flags(self.options)),
                json.dumps(commands),
            )
        return _digest(self._base, json.dumps(attribute))

    def whole(self) -> str:
        if self._whole is None:
            git = self.view.files is not None
            revision = nix.flake_revision(self.flake.path)[0] if git else None
            self._whole = _digest(str(revision), self.view.digest(""))
        return self._whole

    def before(self) -> Before | None:
        return Before(self.whole()) if self.usable else None

    def _record(self, attribute: nix.Attributes) -> Path:
        key = _digest(str(self.flake.path), json.dumps(attribute))[:32]
        return self.directory / f"{key}.json"

    def reuse(self, attribute: nix.Attributes) -> nix.System | None:
        """The machine's system from its record, if nothing it depends on changed."""
        if not self.usable:
            return None
        try:
            record = json.loads(self._record(attribute).read_text())
        except (OSError, ValueError):
            return None
        if record.get("base") != self.base(attribute) or not Path(record["drv"]).exists():
            return None
        if record.get("whole") is not None:
            fresh = record["whole"] == self.whole()
        else:
            fresh = all(self.view.digest(path) == d for path, d in record["paths"].items())
        return nix.System(record["drv"], record["out"]) if fresh else None

    def keep(self, chunk: Mapping[str, nix.Attributes], traced: nix.Traced, before: Before) -> None:
        """Record each machine of an evaluated chunk with what it read."""
        prefix = f"{self.relative}/flake.nix" if self.relative != "." else "flake.nix"
        reads = traced.reads.get(next(iter(traced.reads), ""), [])
        # The first file Nix checks is the flake's own flake.nix, in its source's store copy.
        if not reads or not reads[0].endswith(f"/{prefix}"):
            return
        source = reads[0].removesuffix(f"/{prefix}")
        copy = Tree(Path(source), None)
        try:
            referenced = source in nix.requisites([s.drv for s in traced.systems.values()])
        except CommandError:
            return
        for name, attribute in chunk.items():
            system = traced.systems[name]
            paths = sorted(
                {
                    path.removeprefix(source).lstrip("/")
                    for path in traced.reads.get(name, [])
                    if path == source or path.startswith(f"{source}/")
                }
            )
            whole = referenced or any(copy.names_source_info(path) for path in paths)
            record = {
                "base": self.base(attribute),
                "whole": before.whole if whole else None,
                "paths": {} if whole else {path: copy.digest(path) for path in paths},
                "drv": system.drv,
                "out": system.out,
            }
            self._write(self._record(attribute), record)

    def _write(self, path: Path, record: dict[str, object]) -> None:
        write_atomically(path, json.dumps(record, indent=1))


class Tree:
    """A flake's source as Nix takes it: a directory, and (git) the files of it Nix copies;
    digests of its paths the same whether read from the work tree or from Nix's store copy."""

    def __init__(self, top: Path, files: list[str] | None) -> None:
        self.top = top
        self.files = files
        self._tracked = set(files) if files is not None else None
        self._digests: dict[str, str] = {}

    def digest(self, path: str) -> str:
        """A path's kind and content (a directory's: everything in it), or that it is absent."""
        if path not in self._digests:
            self._digests[path] = _digest(*self._entries(path))
        return self._digests[path]

    def names_source_info(self, path: str) -> bool:
        full = self.top / path
        if not full.is_file() or full.is_symlink():
            return False
        return bool(SOURCE_INFO.search(full.read_bytes()))

    def _entries(self, path: str) -> list[str]:
        if self._tracked is None:
            return self._walk(path)
        if path in self._tracked:
            return [self._fingerprint(path)]
        inside = [f for f in self.files or () if not path or f.startswith(f"{path}/")]
        if not inside:
            return ["absent"]
        below = set(inside)
        for file in inside:  # and the directories git implies, as Nix's copy has them
            parents = file.split("/")[:-1]
            for depth in range(1, len(parents) + 1):
                directory = "/".join(parents[:depth])
                if not path or directory.startswith(f"{path}/"):
                    below.add(directory)
        return ["D", *(f"{p}\0{self._fingerprint(p)}" for p in sorted(below))]

    def _walk(self, path: str) -> list[str]:
        full = self.top / path if path else self.top
        if not os.path.lexists(full):
            return ["absent"]
        if not full.is_dir() or full.is_symlink():
            return [self._fingerprint(path)]
        below = []
        for directory, subdirectories, names in os.walk(full):
            for name in [*subdirectories, *names]:
                below.append(os.path.relpath(os.path.join(directory, name), self.top))
        return ["D", *(f"{p}\0{self._fingerprint(p)}" for p in sorted(below))]

    def _fingerprint(self, path: str) -> str:
        full = self.top / path
        info = full.lstat()
        if stat.S_ISLNK(info.st_mode):
            return f"L{os.readlink(full)}"
        if stat.S_ISDIR(info.st_mode):
            return "D"
        if not stat.S_ISREG(info.st_mode):  # a socket or a pipe: not to be opened; Nix refuses it
            return f"S{stat.S_IFMT(info.st_mode)}"
        executable = "x" if info.st_mode & 0o100 else "-"
        return f"F{executable}{file_sha256(full)}"


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()
