"""Sources for /var/src: declarations, their checks, content digests and the local build stage.

A machine's sources come from pyinfra data, key ``sources``, a mapping of names to sources::

    sources = {
        "nixpkgs": {"type": "git", "url": "https://github.com/NixOS/nixpkgs", "ref": "nixos-24.05"},
        "config-machine": {"type": "file", "path": "config/machines/{machine}"},
        "web-app-dist": {"type": "file", "build": {...}},
    }

The layers are read lowest first, as pyinfra orders data: ``group_data/all.py``, then each
group of the machine (``group_data/<class or role>.py``), then the fleet file, then ``--data``.
An entry merges field by field into the same name from a lower layer (unless it changes the
type, which replaces it), and ``None`` removes the name. ``{machine}`` in any string is the
machine's name. The flake is always the source ``config``.

Everything that can be checked on the controller is checked for every selected machine before
anything is copied: a bad declaration raises `SourcesInvalid`, one line per problem naming the
machine, the source and where it was declared.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import stat
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from flakefleet.process import CommandError, run

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


@dataclass(frozen=True)
class Ready:
    """A source as it goes to the machine: its digest (None while a build or the sources a
    derivation depends on are pending) and the local file or tree rsync sends (None for a
    symlink or a derivation)."""

    source: Source
    digest: str | None
    local: Path | None = None
    checksum: bool = False
    stage: BuildStage | None = None


@dataclass(frozen=True)
class MachineSources:
    """Everything the sources step needs for one machine, decided on the controller."""

    machine: str
    sources: tuple[Ready, ...]
    keep_undeclared: bool = False
    force: bool = False
    resync: bool = False
    rsync_options: tuple[str, ...] = ()

    def pending_builds(self) -> list[Ready]:
        """Sources whose build stage must run before their digest is known."""
        return [item for item in self.sources if item.stage is not None and item.digest is None]

    def finalize(self, built: Mapping[str, Ready]) -> list[Ready]:
        """Every source with its digest, once `built` holds the sources that were built.

        A derivation is realised on the machine and may read any other source, so its digest
        covers theirs: it is realised again whenever one of them changes.
        """
        items = [built.get(item.source.name, item) for item in self.sources]
        others = sorted(
            (item.source.name, item.digest or "")
            for item in items
            if item.source.type != "derivation"
        )
        return [
            replace(item, digest=_derivation_digest(item.source, others))
            if item.source.type == "derivation"
            else item
            for item in items
        ]


# ----------------------------------------------------------------------------- declarations


def layers(host: Any, inventory: Any, fleet_file: str) -> list[tuple[str, Mapping[str, Any]]]:
    """The data layers a machine's sources come from, lowest first, each with its label."""
    found: list[tuple[str, Mapping[str, Any]]] = [("group_data/all.py", inventory.get_data())]
    found += [(f"group_data/{group}.py", inventory.get_group_data(group)) for group in host.groups]
    found.append((f"{fleet_file}, machine {host.name!r}", inventory.get_host_data(host.name)))
    found.append(("--data", inventory.get_override_data()))
    return found


@dataclass
class Declared:
    """A source's merged fields and the layer each field came from (`*`: the last layer)."""

    spec: dict[str, Any]
    origins: dict[str, str] = field(default_factory=dict)

    def origin(self, field_name: str | None = None) -> str:
        return self.origins.get(field_name or "*", self.origins.get("*", "?"))


def merge(machine: str, found: Sequence[tuple[str, Mapping[str, Any]]]) -> dict[str, Declared]:
    """Merge the layers' `sources` mappings (see the module docstring for the rules)."""
    merged: dict[str, Declared] = {}
    for label, data in found:
        declared = data.get("sources")
        if declared is None:
            continue
        if not isinstance(declared, Mapping):
            raise SourceError(machine, None, label, "expected a mapping of names to sources")
        for name, spec in declared.items():
            if spec is None:
                merged.pop(name, None)
                continue
            if not isinstance(spec, Mapping):
                raise SourceError(machine, str(name), label, "expected a mapping of fields")
            earlier = merged.get(name)
            same_type = earlier is not None and spec.get("type", earlier.spec.get("type")) == (
                earlier.spec.get("type")
            )
            if earlier is not None and same_type:
                earlier.spec.update(spec)
                earlier.origins.update({key: label for key in spec} | {"*": label})
            else:
                merged[name] = Declared(dict(spec), {key: label for key in spec} | {"*": label})
    return merged


def config_layer(flake: str | None) -> list[tuple[str, Mapping[str, Any]]]:
    """The flake as the source `config`, below every declared layer (so a group may add
    filters to it)."""
    if not flake:
        return []
    spec = {"type": "file", "path": flake, "exclude": list(CONFIG_EXCLUDES), "checksum": True}
    return [("data key 'flake'", {"sources": {CONFIG: spec}})]


def parse(machine: str, name: Any, declared: Declared, root: Path) -> Source:
    """Check one merged declaration and fill in `{machine}`; relative paths are relative to
    `root` (the repository). Raises SourceError naming the field."""
    origin = declared.origin()
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name:
        raise SourceError(
            machine,
            str(name),
            origin,
            f"{name!r} is not a plain file name (letters, digits, '.', '_', '+', '-'; "
            "not starting with '.'; no '..')",
        )
    spec = _fill(declared.spec, machine)
    kind = spec.get("type")
    if kind not in TYPES:
        raise SourceError(
            machine,
            name,
            declared.origin("type"),
            f"unknown type {kind!r} (expected one of: {', '.join(TYPES)})",
            "type",
        )
    for key in spec:
        if key not in FIELDS[kind]:
            raise SourceError(
                machine,
                name,
                declared.origin(key),
                f"unknown field {key!r} for a {kind} source "
                f"(expected one of: {', '.join(FIELDS[kind])})",
                key,
            )
    check = _Checker(machine, name, declared, spec)
    return _PARSERS[kind](check, Source(name=name, type=kind, origin=origin), root)


def _parse_file(check: _Checker, source: Source, root: Path) -> Source:
    build = _parse_build(check, check.spec.get("build"), root)
    if build and "path" in check.spec:
        check.fail("path", "give either 'path' or 'build', not both")
    return replace(
        source,
        path=None if build else _local_path(check, "path", root),
        include=check.strings("include"),
        exclude=check.strings("exclude"),
        # A build writes every file anew: only content tells whether its output changed.
        checksum=check.boolean("checksum", default=build is not None),
        build=build,
    )


def _parse_git(check: _Checker, source: Source, root: Path) -> Source:
    ref = check.text("ref")
    if ref.startswith("-") or any(c.isspace() for c in ref):
        check.fail("ref", f"{ref!r} is not a git ref")
    url = _git_url(check.text("url"), root)
    return replace(source, url=url, ref=ref, submodules=check.boolean("submodules"))


def _parse_symlink(check: _Checker, source: Source, root: Path) -> Source:
    return replace(source, target=check.text("target"))


def _parse_pipe(check: _Checker, source: Source, root: Path) -> Source:
    return replace(source, command=check.text("command"), mode=check.mode("mode"))


def _parse_derivation(check: _Checker, source: Source, root: Path) -> Source:
    expression, flake = check.spec.get("expression"), check.spec.get("flake")
    if (expression is None) == (flake is None):
        check.fail(None, "give exactly one of 'expression' (a Nix expression) or 'flake'")
    key = "expression" if expression is not None else "flake"
    return replace(source, **{key: check.text(key)})


def _fill(value: Any, machine: str) -> Any:
    """`{machine}` replaced in every string of a declaration."""
    if isinstance(value, str):
        return value.replace("{machine}", machine)
    if isinstance(value, Mapping):
        return {_fill(key, machine): _fill(item, machine) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_fill(item, machine) for item in value]
    return value


@dataclass
class _Checker:
    """Typed access to a declaration's fields, failing with the field's origin."""

    machine: str
    name: str
    declared: Declared
    spec: Mapping[str, Any]

    def fail(self, key: str | None, problem: str) -> None:
        raise SourceError(self.machine, self.name, self.declared.origin(key), problem, key)

    def text(self, key: str) -> str:
        value = self.spec.get(key)
        if not isinstance(value, str) or not value.strip():
            self.fail(key, "missing" if value is None else f"expected a string, not {value!r}")
        return str(value)

    def strings(self, key: str) -> tuple[str, ...]:
        value = self.spec.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.fail(key, f"expected a list of patterns, not {value!r}")
        return tuple(value)

    def boolean(self, key: str, default: bool = False) -> bool:
        value = self.spec.get(key, default)
        if not isinstance(value, bool):
            self.fail(key, f"expected true or false, not {value!r}")
        return bool(value)

    def mode(self, key: str) -> int:
        value = self.spec.get(key, "0644")
        if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3}", value):
            return int(value, 8)
        self.fail(key, f"expected a file mode such as '0644', not {value!r}")
        return 0


def _local_path(check: _Checker, key: str, root: Path) -> Path:
    path = root / check.text(key)
    if not path.exists():
        check.fail(key, f"{check.spec[key]!r} does not exist ({path})")
    return path


def _parse_build(check: _Checker, value: Any, root: Path) -> Build | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        check.fail("build", "expected a mapping with inputs, command and output")
    for key in value:
        if key not in BUILD_FIELDS:
            check.fail(
                "build", f"unknown build field {key!r} (expected: {', '.join(BUILD_FIELDS)})"
            )
    inputs = value.get("inputs")
    if not isinstance(inputs, Mapping) or not inputs:
        check.fail("build", "'inputs' must map destinations in the build directory to local paths")
    resolved = []
    for destination, local in dict(inputs).items():
        if not isinstance(destination, str) or not _relative(destination, allow_dot=True):
            check.fail("build", f"input destination {destination!r} is not a relative path")
        if not isinstance(local, str) or not (root / local).exists():
            check.fail("build", f"input {destination!r}: {local!r} does not exist ({root / local})")
        resolved.append((destination, root / local))
    command, output = value.get("command"), value.get("output")
    if not isinstance(command, str) or not command.strip():
        check.fail("build", "'command' must be a shell command")
    if not isinstance(output, str) or not _relative(output, allow_dot=False):
        check.fail("build", "'output' must be a relative path in the build directory")
    resolved.sort(key=lambda item: (item[0] != ".", item[0].count("/"), item[0]))
    return Build(tuple(resolved), str(command), str(output))


def _relative(path: str, allow_dot: bool) -> bool:
    parts = Path(path).parts
    return (
        bool(path)
        and not path.startswith("/")
        and ".." not in parts
        and (allow_dot or path not in (".", "./"))
    )


def _git_url(url: str, root: Path) -> str:
    """A URL as given, or a local repository path made absolute (relative to `root`)."""
    if "://" in url or re.match(r"[^/]+:", url):
        return url
    return str((root / url).resolve())


_PARSERS = {
    "file": _parse_file,
    "git": _parse_git,
    "symlink": _parse_symlink,
    "pipe": _parse_pipe,
    "derivation": _parse_derivation,
}


# ----------------------------------------------------------------------------- digests


def list_tree(path: Path, include: Sequence[str], exclude: Sequence[str], empty: Path) -> list[str]:
    """The relative paths rsync sends from `path` with these filters ('' for a single file).

    rsync itself lists them (a dry run into an empty directory), so the digest covers exactly
    what the sync sends, whatever the filter rules mean.
    """
    if not path.is_dir():
        return [""]
    argv = ["rsync", "--archive", "--dry-run", "--8-bit-output", "--out-format=%n"]
    argv += filter_options(include, exclude)
    listed = run([*argv, f"{path}/", f"{empty}/"]).stdout
    names = (_unescape(line).rstrip("/") for line in listed.splitlines())
    return sorted(name for name in names if name not in ("", "."))


def filter_options(include: Sequence[str], exclude: Sequence[str]) -> list[str]:
    """rsync filter options: includes first, then excludes (rsync's first match wins)."""
    return [*(f"--include={p}" for p in include), *(f"--exclude={p}" for p in exclude)]


def _unescape(name: str) -> str:
    return re.sub(r"\\#([0-7]{3})", lambda match: chr(int(match.group(1), 8)), name)


def tree_digest(path: Path, entries: Sequence[str], checksum: bool) -> str:
    """A sha256 over the listed entries: path, type, permissions, link target, and the file's
    content (`checksum`) or its size and modification time (rsync's quick check, to the
    nanosecond). Two trees with the same digest sync to the same copy."""
    digest = hashlib.sha256()
    for entry in entries:
        full = path / entry if entry else path
        info = full.lstat() if entry else full.stat()
        head = f"{stat.S_IMODE(info.st_mode):o}\0{entry}\0".encode()
        if stat.S_ISLNK(info.st_mode):
            digest.update(b"L" + head + os.readlink(full).encode() + b"\0")
        elif stat.S_ISDIR(info.st_mode):
            digest.update(b"D" + head)
        elif stat.S_ISREG(info.st_mode):
            what = file_sha256(full) if checksum else f"{info.st_size}:{info.st_mtime_ns}"
            digest.update(b"F" + head + what.encode() + b"\0")
        else:
            digest.update(b"S" + head)
    return digest.hexdigest()


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


def _derivation_digest(source: Source, others: Sequence[tuple[str, str]]) -> str:
    text = source.expression or source.flake
    kind = "expression" if source.expression else "flake"
    return source_digest(source, "\0".join([kind, text, *(f"{n}={d}" for n, d in others)]))


# ----------------------------------------------------------------------------- git


class GitError(RuntimeError):
    """A repository that cannot be fetched, or a ref it does not have."""

    def __init__(self, field_name: str, message: str) -> None:
        self.field_name = field_name
        super().__init__(message)


class GitCache:
    """Repositories fetched on the controller and checked out there, per commit.

    The machine never reaches the repository: the checkout (with its `.git`) is sent like a
    file tree, so a machine needs neither network access, credentials nor git. Each URL is
    fetched at most once per run, and not at all when the ref is a commit already fetched.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._fetched: set[str] = set()

    def _dir(self, url: str) -> Path:
        return self.root / hashlib.sha256(url.encode()).hexdigest()[:16]

    @contextlib.contextmanager
    def _locked(self, url: str) -> Iterator[Path]:
        """The URL's cache directory, locked against other deploys on this controller."""
        directory = self._dir(url)
        directory.mkdir(parents=True, exist_ok=True)
        with (directory / "lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield directory

    def commit(self, url: str, ref: str) -> str:
        """The commit `ref` names in the repository at `url` (fetching it first)."""
        with self._locked(url) as directory:
            mirror = directory / "mirror.git"
            if not mirror.exists():
                run(["git", "init", "--quiet", "--bare", str(mirror)])
            known = self._resolve(mirror, ref)
            if known == ref.lower():  # a full commit id already here: nothing can move it
                return known
            if url not in self._fetched:
                self._fetch(mirror, url, ["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"])
                self._fetched.add(url)
            commit = self._resolve(mirror, ref)
            if commit is None and re.fullmatch(r"[0-9a-fA-F]{7,40}", ref):
                # A commit no branch or tag reaches, if the server hands those out.
                with contextlib.suppress(GitError):
                    self._fetch(mirror, url, [ref])
                commit = self._resolve(mirror, ref)
            if commit is None:
                raise GitError("ref", f"ref {ref!r} does not exist in {url}")
            return commit

    def _fetch(self, mirror: Path, url: str, refspecs: list[str]) -> None:
        try:
            run(
                ["git", "-C", str(mirror), "fetch", "--quiet", "--prune", "--force", "--no-tags",
                 url, *refspecs],
                env={"GIT_TERMINAL_PROMPT": "0"},
                timeout=600,
            )  # fmt: skip
        except CommandError as error:
            lines = [line for line in error.output.splitlines() if line.strip()]
            raise GitError("url", f"cannot fetch {url}: {lines[0] if lines else error}") from None

    @staticmethod
    def _resolve(mirror: Path, ref: str) -> str | None:
        completed = run(
            ["git", "-C", str(mirror), "rev-parse", "--verify", "--quiet", "--end-of-options",
             f"{ref}^{{commit}}"],
            check=False,
        )  # fmt: skip
        return completed.stdout.strip() or None if completed.returncode == 0 else None

    def checkout(self, url: str, commit: str, submodules: bool) -> Path:
        """A checkout of `commit` (with its submodules if asked), made once and kept."""
        with self._locked(url) as directory:
            trees = directory / "trees"
            tree = trees / (commit + ("-submodules" if submodules else ""))
            (trees / f"{tree.name}.used").parent.mkdir(parents=True, exist_ok=True)
            (trees / f"{tree.name}.used").touch()
            if not tree.exists():
                self._make_checkout(directory / "mirror.git", url, commit, submodules, tree)
            _prune(trees, keep={tree.name, f"{tree.name}.used"}, marker=".used")
            return tree

    def _make_checkout(
        self, mirror: Path, url: str, commit: str, submodules: bool, tree: Path
    ) -> None:
        partial = tree.with_name(f"{tree.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        git = ["git", "-C", str(partial)]
        try:
            run(["git", "clone", "--quiet", "--no-checkout", str(mirror), str(partial)])
            run([*git, "remote", "set-url", "origin", url])
            run([*git, "checkout", "--quiet", "--detach", commit])
            if submodules:
                local = "://" not in url or url.startswith("file://")
                allow = ["-c", "protocol.file.allow=always"] if local else []
                run(
                    [*git, *allow, "submodule", "update", "--init", "--recursive", "--quiet"],
                    env={"GIT_TERMINAL_PROMPT": "0"},
                    timeout=600,
                )
        except CommandError as error:
            shutil.rmtree(partial, ignore_errors=True)
            lines = [line for line in error.output.splitlines() if line.strip()]
            problem = lines[-1] if lines else str(error)
            raise GitError("submodules" if submodules else "ref", problem) from None
        for path in [partial, *partial.rglob("*")]:
            os.utime(path, (GIT_MTIME, GIT_MTIME), follow_symlinks=False)
        partial.rename(tree)


def _prune(directory: Path, keep: set[str], marker: str) -> None:
    """Delete entries of `directory` whose `<name><marker>` file was not touched for a day."""
    now = time.time()
    for used in directory.glob(f"*{marker}"):
        if used.name in keep or now - used.stat().st_mtime < PRUNE_AFTER:
            continue
        shutil.rmtree(directory / used.name.removesuffix(marker), ignore_errors=True)
        used.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- build stage


@dataclass(frozen=True)
class BuildStage:
    """A source's build for one machine, in `.flakefleet/build/<machine>/<source>/<key>/`.

    `key` is a digest of the inputs' content, the command and the output: a build whose key
    has a finished directory is not run again.
    """

    machine: str
    source: Source
    key: str
    directory: Path

    @property
    def finished(self) -> Path:
        return self.directory / self.key

    @property
    def output(self) -> Path:
        assert self.source.build is not None
        return self.finished / self.source.build.output

    def cached(self) -> bool:
        return self.output.is_dir()

    def run(self) -> Path:
        """Build in a fresh directory; returns the output directory or raises BuildError."""
        assert self.source.build is not None
        build = self.source.build
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = self.directory / f"{self.key}.partial-{os.getpid()}-{threading.get_ident()}"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        for destination, local in build.inputs:
            _copy_in(local, partial / destination)
        completed = run(
            ["sh", "-c", f"exec 2>&1\n{build.command}"],
            cwd=str(partial),
            env={"FLAKEFLEET_MACHINE": self.machine, "FLAKEFLEET_SOURCE": self.source.name},
            check=False,
        )
        log = self.directory / "build.log"
        log.write_text(completed.stdout)
        if completed.returncode != 0 or not (partial / build.output).is_dir():
            failed = self.directory / "failed"
            shutil.rmtree(failed, ignore_errors=True)
            partial.rename(failed)
            tail = " | ".join(line.strip() for line in completed.stdout.strip().splitlines()[-3:])
            why = (
                f"exited {completed.returncode}"
                if completed.returncode
                else f"made no {build.output!r} directory"
            )
            message = f"build failed ({why}): {tail or '(no output)'} [log: {log}]"
            raise BuildError(message, completed.stdout)
        if self.finished.exists():  # another deploy built the same inputs meanwhile
            shutil.rmtree(partial)
        else:
            partial.rename(self.finished)
        self._prune()
        return self.output

    def _prune(self) -> None:
        builds = [p for p in self.directory.iterdir() if p.is_dir() and len(p.name) == 64]
        builds.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        for old in builds[KEEP_BUILDS:]:
            if old.name != self.key:
                shutil.rmtree(old, ignore_errors=True)


def _copy_in(local: Path, destination: Path) -> None:
    """Copy a file or tree into the build directory, keeping symlinks as symlinks."""
    if local.is_dir():
        shutil.copytree(local, destination, symlinks=True, dirs_exist_ok=True)
    else:
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(local, destination, follow_symlinks=False)


# ----------------------------------------------------------------------------- one run


class RunSources:
    """The sources of every selected machine of one run, checked and digested once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state = root / STATE_DIR
        self.git = GitCache(self.state / "git")
        self.machines: dict[str, MachineSources] = {}
        self._trees: dict[tuple[Path, tuple[str, ...], tuple[str, ...], bool], str] = {}
        self._empty = self.state / "empty"

    def add(self, machine: str, found: Sequence[tuple[str, Mapping[str, Any]]], data: Any) -> None:
        """Check and digest one machine's sources; raises SourceError on the first problem."""
        declared = merge(machine, found)
        items = []
        for name, spec in declared.items():
            source = parse(machine, name, spec, self.root)
            try:
                items.append(self._ready(machine, source))
            except GitError as error:
                origin = spec.origin(error.field_name)
                raise SourceError(machine, name, origin, str(error), error.field_name) from None
        # Derivations last: they are realised on the machine and may read the others.
        items.sort(key=lambda item: (item.source.type == "derivation", item.source.name))
        self.machines[machine] = MachineSources(
            machine=machine,
            sources=tuple(items),
            keep_undeclared=bool(data.get("sources_keep_undeclared", False)),
            force=bool(data.get("sources_force", False)),
            resync=bool(data.get("sources_resync", False)),
            rsync_options=tuple(str(o) for o in data.get("sources_rsync_options") or ()),
        )

    def _ready(self, machine: str, source: Source) -> Ready:
        if source.type == "file" and source.build is not None:
            return self._built(machine, source)
        if source.type == "file":
            assert source.path is not None
            return self._tree(source, source.path, source.checksum)
        if source.type == "git":
            commit = self.git.commit(source.url, source.ref)
            tree = self.git.checkout(source.url, commit, source.submodules)
            return Ready(source, source_digest(source, commit), tree, checksum=True)
        if source.type == "pipe":
            return self._pipe(machine, source)
        if source.type == "symlink":
            return Ready(source, source_digest(source, source.target))
        return Ready(source, None)  # a derivation: digested with the others (finalize)

    def _tree(self, source: Source, path: Path, checksum: bool) -> Ready:
        key = (path.resolve(), source.include, source.exclude, checksum)
        if key not in self._trees:
            self._empty.mkdir(parents=True, exist_ok=True)
            entries = list_tree(path, source.include, source.exclude, self._empty)
            self._trees[key] = tree_digest(path, entries, checksum)
        return Ready(source, source_digest(source, self._trees[key]), path, checksum)

    def _built(self, machine: str, source: Source) -> Ready:
        assert source.build is not None
        parts = [source.build.command, source.build.output]
        for destination, local in source.build.inputs:
            empty = Source(name=source.name, type="file", origin=source.origin)
            parts += [destination, self._tree(empty, local, checksum=True).digest or ""]
        key = hashlib.sha256("\0".join(parts).encode()).hexdigest()
        stage = BuildStage(machine, source, key, self.state / "build" / machine / source.name)
        if stage.cached():
            return replace(self._tree(source, stage.output, source.checksum), stage=stage)
        return Ready(source, None, None, source.checksum, stage)

    def built(self, item: Ready) -> Ready:
        """Run a pending build stage; the source is then ready. Raises BuildError."""
        assert item.stage is not None
        output = item.stage.run()
        return replace(self._tree(item.source, output, item.source.checksum), stage=item.stage)

    def _pipe(self, machine: str, source: Source) -> Ready:
        """Run the command now, so a failure stops the run before anything is copied."""
        directory = self.state / "pipe"
        directory.mkdir(parents=True, exist_ok=True)
        partial = directory / f"partial-{os.getpid()}-{machine}-{source.name}"
        command = f'( {source.command}\n) > "$FLAKEFLEET_OUTPUT"'
        result = run(
            ["sh", "-c", command],
            cwd=str(self.root),
            env={"FLAKEFLEET_MACHINE": machine, "FLAKEFLEET_OUTPUT": str(partial)},
            check=False,
        )
        if result.returncode != 0:
            partial.unlink(missing_ok=True)
            tail = " | ".join(line.strip() for line in result.stderr.strip().splitlines()[-2:])
            raise SourceError(
                machine,
                source.name,
                source.origin,
                f"command exited {result.returncode}: {tail or '(no output)'}",
                "command",
            )
        digest = source_digest(source, file_sha256(partial))
        final = directory / digest
        partial.chmod(source.mode)
        partial.replace(final)
        (directory / f"{digest}.used").touch()
        _prune(directory, keep={digest, f"{digest}.used"}, marker=".used")
        return Ready(source, digest, final, checksum=True)


def check_run(
    root: Path,
    machines: Sequence[tuple[str, Sequence[tuple[str, Mapping[str, Any]]], Any]],
) -> RunSources:
    """Check every machine's sources (name, data layers, host data); raises SourcesInvalid
    with every machine's first problem."""
    sources = RunSources(root)
    errors = []
    for machine, found, data in machines:
        try:
            sources.add(machine, found, data)
        except SourceError as error:
            errors.append(error)
    if errors:
        raise SourcesInvalid(errors)
    return sources
