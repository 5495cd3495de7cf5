"""Generated vars (clan's model): per-machine secrets and public values made on the controller.

A generator is pyinfra data, key ``generators``, merged by name across the layers like keys::

    generators = {
        "wireguard": {
            "files": {"private": {"secret": True}, "public": {"secret": False}},
            "script": "openssl genpkey -algorithm x25519 > $out/private && ...",
        },
        "api-token": {"files": {"token": {}}, "script": "openssl rand -hex 16 > $out/token",
                      "share": True},
        "app-env": {"files": {"env": {}}, "dependencies": ["api-token", "wireguard"],
                    "script": 'echo "TOKEN=$(cat $in/api-token/token)" > $out/env'},
        "root-password": {"files": {"hash": {}}, "prompts": ["password"],
                          "script": "openssl passwd -6 -stdin < $prompts/password > $out/hash"},
    }

A machine's generators that lack a file run on the controller, dependencies first, each in an
empty directory (its working directory) with ``$in/<dependency>/<file>`` (the dependencies'
files), ``$prompts/<prompt>`` (asked once on the terminal) and ``$out`` for its files; the
directories are in memory (/dev/shm) where the controller has it, and removed after. Secret
files (the default) are stored age-encrypted to the machine's host key (and to every machine
that declares a shared generator) and the admins, as ``<vars>/<machine>/<generator>/<file>.age``
(``<vars>/shared/...``); public ones in plain text beside them, for the flake to read.
Each secret file is deployed as the key ``<generator>.<file>`` to
``/run/secrets/<generator>/<file>``. `regenerate` (a list of generator names) runs them again,
and everything that depends on them.
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flakefleet.keys import ContentError, Declared, KeyProblem, decrypt, merge
from flakefleet.sources.model import NAME_PATTERN

FIELDS = ("files", "script", "prompts", "dependencies", "share")
SECRETS_DIRECTORY = "/run/secrets"
SHARED = "shared"


@dataclass(frozen=True)
class Generator:
    name: str
    files: dict[str, bool]  # file name -> secret
    script: str
    prompts: tuple[str, ...]
    dependencies: tuple[str, ...]
    share: bool
    origin: str


def parse(machine: str, name: Any, declared: Declared) -> Generator:
    """Check one merged generator; raises KeyProblem naming the field."""

    def fail(key: str | None, problem: str) -> None:
        raise KeyProblem(machine, str(name), declared.origin(key), problem, key, "generator")

    spec = declared.spec
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or name == SHARED:
        fail(None, f"{name!r} is not a plain name")
    for key in spec:
        if key not in FIELDS:
            fail(key, f"unknown field {key!r} (expected one of: {', '.join(FIELDS)})")
    files = spec.get("files")
    if not isinstance(files, Mapping) or not files:
        fail("files", "expected a mapping of file names to {'secret': True or False}")
    parsed = {}
    for file, options in dict(files).items():
        options = options or {}
        if not isinstance(file, str) or not NAME_PATTERN.match(file) or file.endswith(".age"):
            fail("files", f"{file!r} is not a plain file name (nor may it end in .age)")
        if not isinstance(options, Mapping) or set(options) - {"secret"}:
            fail("files", f"{file!r}: expected {{'secret': True or False}}")
        parsed[file] = bool(options.get("secret", True))
    script = spec.get("script")
    if not isinstance(script, str) or not script.strip():
        fail("script", "expected a shell script")
    lists = {}
    for key in ("prompts", "dependencies"):
        value = spec.get(key, [])
        if not isinstance(value, list) or not all(
            isinstance(v, str) and NAME_PATTERN.match(v) for v in value
        ):
            fail(key, "expected a list of plain names")
        lists[key] = tuple(value)
    share = spec.get("share", False)
    if not isinstance(share, bool):
        fail("share", "expected True or False")
    return Generator(str(name), parsed, str(script), lists["prompts"], lists["dependencies"],
                     share, declared.origin())  # fmt: skip


def declared(machine: str, found: Sequence[tuple[str, Mapping[str, Any]]]) -> dict[str, Generator]:
    """A machine's generators, checked: dependencies exist, and form no cycle."""
    merged = merge(machine, found, "generators", (), "generator")
    generators = {name: parse(machine, name, spec) for name, spec in merged.items()}
    for generator in generators.values():
        for dependency in generator.dependencies:
            if dependency not in generators:
                raise KeyProblem(machine, generator.name, merged[generator.name].origin(
                    "dependencies"), f"depends on {dependency!r}, which is not declared",
                    "dependencies", "generator")  # fmt: skip
    order(machine, generators)
    return generators


def order(machine: str, generators: Mapping[str, Generator]) -> list[str]:
    """Dependencies first; a cycle is an error naming it."""
    done: list[str] = []
    visiting: list[str] = []

    def visit(name: str) -> None:
        if name in done:
            return
        if name in visiting:
            cycle = [*visiting[visiting.index(name) :], name]
            raise KeyProblem(machine, name, generators[name].origin,
                             f"dependency cycle: {' -> '.join(cycle)}", "dependencies",
                             "generator")  # fmt: skip
        visiting.append(name)
        for dependency in generators[name].dependencies:
            visit(dependency)
        visiting.pop()
        done.append(name)

    for name in sorted(generators):
        visit(name)
    return done


class Store:
    """Where vars live: ``<root>/<machine or shared>/<generator>/<file>[.age]``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def of(cls, repository: Path, settings: Any) -> Store:
        """A machine's store: its `vars_dir`, else its flake's ``vars/`` (the flake reads the
        public files there)."""
        if settings.vars_dir:
            return cls(repository / settings.vars_dir)
        return cls(repository / settings.flake / "vars")

    def secrets(self, readers: Mapping[str, Sequence[str]]) -> dict[Path, list[str]]:
        """Every secret file kept here, with the machines that read it: a machine's own, and
        a shared generator's every machine that declares it (`readers`: generator -> them)."""
        found = {}
        for path in sorted(self.root.glob("*/*/*.age")):
            owner, generator = path.parent.parent.name, path.parent.name
            if owner == SHARED:
                if readers.get(generator):
                    found[path] = sorted(readers[generator])
            else:
                found[path] = [owner]
        return found

    def directory(self, machine: str, generator: Generator) -> Path:
        return self.root / (SHARED if generator.share else machine) / generator.name

    def path(self, machine: str, generator: Generator, file: str) -> Path:
        suffix = ".age" if generator.files[file] else ""
        return self.directory(machine, generator) / (file + suffix)

    def complete(self, machine: str, generator: Generator) -> bool:
        return all(self.path(machine, generator, file).exists() for file in generator.files)


Prompt = Callable[[str, str, str], str]  # machine, generator, prompt -> answer


def terminal_prompt(machine: str, generator: str, prompt: str) -> str:
    """Ask on the terminal (never an echoing stdin)."""
    try:
        with open("/dev/tty"):
            pass
    except OSError:
        raise ContentError(
            f"generator {generator} asks for {prompt!r} and there is no terminal to ask on"
        ) from None
    return getpass.getpass(f"flakefleet: {prompt} for {generator} on {machine}: ")


def generate(
    machine: str,
    generators: Mapping[str, Generator],
    store: Store,
    recipients_of: Callable[[Generator], list[str]],
    identity: Path | None,
    regenerate: Sequence[str] = (),
    prompt: Prompt = terminal_prompt,
    done: set[tuple[str, str]] | None = None,
) -> list[str]:
    """Run the machine's generators that lack a file or are to be regenerated (and what
    depends on those), dependencies first; the names of those that ran. `done` holds the
    (machine or "shared", generator) pairs this run already made (a shared one runs once)."""
    done = set() if done is None else done
    ran: list[str] = []
    for name in order(machine, generators):
        generator = generators[name]
        owner = SHARED if generator.share else machine
        if (owner, name) in done:
            continue
        stale = any(dependency in ran for dependency in generator.dependencies)
        if store.complete(machine, generator) and name not in regenerate and not stale:
            continue
        _run(machine, generator, generators, store, recipients_of(generator), identity, prompt)
        done.add((owner, name))
        ran.append(name)
    return ran


def _run(
    machine: str,
    generator: Generator,
    generators: Mapping[str, Generator],
    store: Store,
    recipients: list[str],
    identity: Path | None,
    prompt: Prompt,
) -> None:
    def problem(text: str) -> KeyProblem:
        return KeyProblem(machine, generator.name, generator.origin, text, None, "generator")

    memory = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    work = Path(tempfile.mkdtemp(prefix="flakefleet-vars-", dir=memory))  # 0700
    try:
        inputs, prompts, out, cwd = (work / name for name in ("in", "prompts", "out", "cwd"))
        for directory in (inputs, prompts, out, cwd):
            directory.mkdir(mode=0o700)
        for dependency in generator.dependencies:
            source = generators[dependency]
            (inputs / dependency).mkdir(mode=0o700)
            for file, secret in source.files.items():
                path = store.path(machine, source, file)
                if secret:
                    if identity is None:
                        raise problem("reading a secret input needs the setting 'age_identity'")
                    try:
                        content = decrypt(path, identity)
                    except ContentError as error:
                        raise problem(str(error)) from None
                else:
                    content = path.read_bytes()
                _write_private(inputs / dependency / file, content)
        for name in generator.prompts:
            _write_private(prompts / name, prompt(machine, generator.name, name).encode())
        completed = subprocess.run(
            ["sh", "-c", generator.script], cwd=cwd, capture_output=True, check=False,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "in": str(inputs), "out": str(out), "prompts": str(prompts),
                 "FLAKEFLEET_MACHINE": machine},
        )  # fmt: skip
        if completed.returncode != 0:  # what it printed may be secret: only the status
            raise problem(f"script exited {completed.returncode}")
        missing = [file for file in generator.files if not (out / file).is_file()]
        if missing:
            raise problem(f"script did not write {', '.join(missing)}")
        directory = store.directory(machine, generator)
        directory.mkdir(parents=True, exist_ok=True)
        for file, secret in generator.files.items():
            target = store.path(machine, generator, file)
            partial = target.with_name(f".{target.name}.partial")
            if secret:
                arguments = [word for key in recipients for word in ("--recipient", key)]
                with (out / file).open("rb") as plaintext:
                    encrypted = subprocess.run(["age", "--encrypt", *arguments], stdin=plaintext,
                                               capture_output=True, check=False)  # fmt: skip
                if encrypted.returncode != 0:
                    raise problem(f"age --encrypt failed: {encrypted.stderr.decode().strip()}")
                partial.write_bytes(encrypted.stdout)
            else:
                shutil.copyfile(out / file, partial)
            partial.replace(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write_private(path: Path, content: bytes) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(content)


def key_layer(machine: str, generators: Mapping[str, Generator]) -> tuple[str, dict[str, Any]]:
    """Each secret file as a key ``<generator>.<file>`` at /run/secrets/<generator>/<file>,
    below every declared layer (so `keys` may change its owner or mode)."""
    keys = {
        f"{name}.{file}": {
            "var": f"{name}/{file}",
            "destination": f"{SECRETS_DIRECTORY}/{name}/{file}",
        }
        for name, generator in generators.items()
        for file, secret in generator.files.items()
        if secret
    }
    return ("data key 'generators'", {"keys": keys})
