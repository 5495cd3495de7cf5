"""Keys: secrets uploaded to machines out of band, never through a Nix store (colmena's
`deployment.keys`).

A machine's keys come from pyinfra data, key ``keys``, a mapping of names to keys::

    keys = {
        "db-password": {"age_file": "secrets/db-password.age", "owner": "postgres"},
        "api-token": {"command": "pass show fleet/api-token", "mode": "0440", "group": "web"},
        "wg-private": {"age_file": "secrets/{machine}/wg.age",
                       "destination": "/var/lib/wireguard/private", "upload": "post-activation"},
    }

The layers merge as `sources` do (``group_data/all.py``, the machine's groups, the fleet file,
``--data``): field by field into the same name, except that a layer giving a content field
(`age_file` or `command`) replaces the other one; ``None`` removes a key. ``{machine}`` in any
string is the machine's name.

Every selected machine's keys are read on the controller before any machine is contacted: an
age file is decrypted with the operator's identity (setting `age_identity`), a command run.
The plaintext stays in this process's memory: it goes to `age` or comes from it over pipes,
and to the machine on the standard input of the upload command (see `upload_script`).

Whether a key on a machine is the one declared is decided from a keyed digest (HMAC-SHA256
with a key only the controller has, `.flakefleet/keys/digest.key`) of its content, destination,
owner, group and mode, which the machine keeps in its manifest (`MANIFEST`) and the preflight
reads: a low-entropy secret cannot be guessed back from it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from flakefleet.models import KeyOnMachine
from flakefleet.sources.model import NAME_PATTERN, STATE_DIR

DEFAULT_DIRECTORY = "/run/keys"
DEFAULT_MODE = 0o400
# Where a machine keeps, a line per key, the digest and destination of what was uploaded.
MANIFEST = "/var/lib/flakefleet/keys"
DIGEST_KEY = f"{STATE_DIR}/keys/digest.key"
CONTENT_FIELDS = ("age_file", "command", "var")
FIELDS = (*CONTENT_FIELDS, "destination", "owner", "group", "mode", "upload")
# The line the upload command prints when a key cannot be written, before anything changes.
REFUSED = "@@flakefleet-key "
# A user or group name chown accepts (what useradd allows, with a leading digit for ids).
ACCOUNT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\$?\Z")


class Upload(StrEnum):
    """When a key is uploaded: before the new system is activated, or after (for an owner the
    new system creates)."""

    PRE_ACTIVATION = "pre-activation"
    POST_ACTIVATION = "post-activation"


class KeyProblem(ValueError):
    """A key that cannot be deployed; the message is one line naming machine, key, where it
    was declared and the field."""

    def __init__(
        self,
        machine: str,
        name: str | None,
        origin: str,
        problem: str,
        field_name: str | None,
        kind: str = "key",
    ) -> None:
        self.machine = machine
        where = f"{origin}, field {field_name!r}" if field_name else origin
        what = f"{kind} {name!r}" if name is not None else f"{kind}s"
        self.detail = f"{what} ({where}): {problem}"
        super().__init__(f"{machine}: {self.detail}")


class KeysInvalid(ValueError):
    """Bad keys on one or more machines; `lines` has one line per problem."""

    def __init__(self, errors: Sequence[KeyProblem]) -> None:
        self.errors = list(errors)
        machines: dict[str, list[str]] = {}
        for error in errors:
            machines.setdefault(error.detail, []).append(error.machine)
        self.lines = sorted(f"{', '.join(sorted(names))}: {d}" for d, names in machines.items())
        super().__init__("; ".join(self.lines))


@dataclass(frozen=True)
class Key:
    """One machine's key, checked, with its content read."""

    name: str
    destination: str
    owner: str
    group: str
    mode: int
    upload: Upload
    origin: str
    content: bytes = field(repr=False)
    digest: str = ""  # keyed: see `digest`
    unread: str | None = None  # why a plan did not read its content (then it has no digest)

    @property
    def permissions(self) -> str:
        """The mode as `ls -l` shows it, e.g. ``-r--------``."""
        bits = "".join(
            letter if self.mode & (1 << (8 - index)) else "-"
            for index, letter in enumerate("rwxrwxrwx")
        )
        return "-" + bits


@dataclass(frozen=True)
class Declared:
    spec: dict[str, Any]
    origins: dict[str, str]

    def origin(self, field_name: str | None = None) -> str:
        return self.origins.get(field_name or "*", self.origins.get("*", "?"))


def merge(
    machine: str,
    found: Sequence[tuple[str, Mapping[str, Any]]],
    data_key: str = "keys",
    exclusive: Sequence[str] = CONTENT_FIELDS,
    kind: str = "key",
) -> dict[str, Declared]:
    """Merge the layers' mappings under `data_key` (`keys`, `generators`), lowest first, by
    name and field by field; a layer giving one of the `exclusive` fields drops the others;
    None removes a name."""
    merged: dict[str, Declared] = {}
    for label, data in found:
        declared = data.get(data_key)
        if declared is None:
            continue
        if not isinstance(declared, Mapping):
            raise KeyProblem(machine, None, label, f"expected a mapping of names to {kind}s",
                             None, kind)  # fmt: skip
        for name, spec in declared.items():
            if spec is None:
                merged.pop(name, None)
                continue
            if not isinstance(spec, Mapping):
                raise KeyProblem(machine, str(name), label, "expected a mapping of fields", None,
                                 kind)  # fmt: skip
            earlier = merged.setdefault(name, Declared({}, {}))
            if any(key in spec for key in exclusive):  # another content replaces it
                for key in exclusive:
                    earlier.spec.pop(key, None)
            earlier.spec.update(spec)
            earlier.origins.update({key: label for key in spec} | {"*": label})
    return merged


def parse(
    machine: str, name: Any, declared: Declared, *, root_group: str = "root"
) -> tuple[dict[str, Any], str]:
    """Check one merged declaration; its fields (with `{machine}` filled in and defaults) and
    which content field it has. Raises KeyProblem naming the field."""

    def fail(key: str | None, problem: str) -> None:
        raise KeyProblem(machine, str(name), declared.origin(key), problem, key)

    if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name:
        fail(None, f"{name!r} is not a plain file name (letters, digits, '.', '_', '+', '-')")
    spec = {
        key: value.replace("{machine}", machine) if isinstance(value, str) else value
        for key, value in declared.spec.items()
    }
    for key in spec:
        if key not in FIELDS:
            fail(key, f"unknown field {key!r} (expected one of: {', '.join(FIELDS)})")
    given = [key for key in CONTENT_FIELDS if key in spec]
    if len(given) != 1:
        fail(None, f"give exactly one of {', '.join(CONTENT_FIELDS)}")
    content = given[0]
    if not isinstance(spec[content], str) or not spec[content].strip():
        fail(content, f"expected a string, not {spec[content]!r}")
    destination = spec.setdefault("destination", f"{DEFAULT_DIRECTORY}/{name}")
    if (
        not isinstance(destination, str)
        or not destination.startswith("/")
        or destination.endswith("/")
        or "/../" in destination + "/"
        or "\n" in destination
    ):
        fail("destination", f"expected an absolute file path, not {destination!r}")
    for key, default in (("owner", "root"), ("group", root_group)):
        value = spec.setdefault(key, default)
        if not isinstance(value, str) or not ACCOUNT.match(value):
            fail(key, f"expected a user or group name, not {value!r}")
    mode = spec.get("mode", f"{DEFAULT_MODE:04o}")
    if not (isinstance(mode, str) and re.fullmatch(r"0?[0-7]{3}", mode)):
        fail("mode", f"expected a file mode such as '0400', not {mode!r}")
    spec["mode"] = int(mode, 8)
    upload = spec.setdefault("upload", Upload.PRE_ACTIVATION)
    if upload not in tuple(Upload):
        fail("upload", f"expected one of {', '.join(Upload)}, not {upload!r}")
    spec["upload"] = Upload(upload)
    return spec, content


# -- content, on the controller ------------------------------------------------------------------


class ContentError(RuntimeError):
    """A key's content could not be had; the message says why without any of the content."""


def decrypt(path: Path, identity: Path) -> bytes:
    """An age file's plaintext, decrypted by `age` with the identity file; only over pipes.

    age authenticates every chunk: a tampered, truncated or wrongly-encrypted file fails here.
    """
    if not path.is_file():
        raise ContentError(f"{path} does not exist")
    completed = subprocess.run(  # the one secret-bearing local command: bytes, not text
        ["age", "--decrypt", "--identity", str(identity), str(path)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
    )
    if completed.returncode != 0:
        reason = completed.stderr.decode(errors="replace").strip().splitlines()
        raise ContentError(f"{path}: cannot decrypt: {reason[-1] if reason else 'age failed'}")
    return completed.stdout


def command_output(command: str, machine: str, root: Path) -> bytes:
    """A local command's standard output (run in the repository, `FLAKEFLEET_MACHINE` set).

    Only its exit status is reported on failure: what it printed may be (part of) the secret.
    """
    completed = subprocess.run(
        ["sh", "-c", command],
        cwd=root,
        env={**os.environ, "FLAKEFLEET_MACHINE": machine},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
    )
    if completed.returncode != 0:
        raise ContentError(f"command exited {completed.returncode}")
    return completed.stdout


def digest_key(root: Path) -> bytes:
    """The controller's key for the keys' digests, made on first use (git-ignored).

    Another controller (another operator's checkout) has its own: its first deploy uploads
    every key once more, and then finds them in place.
    """
    path = root / DIGEST_KEY
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return path.read_bytes()
        with os.fdopen(descriptor, "wb") as file:
            file.write(os.urandom(32))
    return path.read_bytes()


def digest(secret: bytes, key: Key) -> str:
    """What the machine keeps of a key: an HMAC of its content and where and how it lies."""
    where = json.dumps([key.name, key.destination, key.owner, key.group, key.mode])
    return hmac.new(secret, where.encode() + b"\0" + key.content, hashlib.sha256).hexdigest()


# -- on the machine ------------------------------------------------------------------------------


def manifest_script(manifest: str = MANIFEST) -> str:
    """What the preflight reads: the manifest (``<name> <digest> <destination>`` a line), then
    after `LISTING` one `ls -ld` of every destination (one process, however many keys)."""
    return (
        f'm={shlex.quote(manifest)}; if [ -f "$m" ]; then cat "$m"; echo \'{LISTING}\'; '
        '(set --; while read -r n d p; do set -- "$@" "$p"; done < "$m"; '
        '[ "$#" = 0 ] || ls -ld -- "$@" 2>/dev/null); fi; true'
    )


LISTING = "@@listing"


def parse_manifest(lines: Sequence[str]) -> dict[str, KeyOnMachine]:
    entries: dict[str, tuple[str, str]] = {}
    listing: list[list[str]] = []
    in_listing = False
    for line in lines:
        line = line.rstrip("\n")
        if line == LISTING:
            in_listing = True
        elif in_listing:
            listing.append(line.split(maxsplit=8))
        else:
            parts = line.split(" ", 2)
            if len(parts) == 3 and NAME_PATTERN.match(parts[0]):
                entries[parts[0]] = (parts[1], parts[2])
    files = {fields[8]: fields for fields in listing if len(fields) == 9}
    found = {}
    for name, (key_digest, destination) in entries.items():
        file = files.get(destination)
        found[name] = KeyOnMachine(
            digest=key_digest,
            destination=destination,
            permissions=file[0][:10] if file else "",  # `.`, `+`, `@`: ACLs, xattrs
            owner=file[2] if file else "",
            group=file[3] if file else "",
        )
    return found


def in_place(key: Key, there: KeyOnMachine | None) -> bool:
    """Whether the machine holds the key as declared (same digest, file there as it should)."""
    return (
        there is not None
        and there.digest == key.digest
        and there.destination == key.destination
        and (there.permissions, there.owner, there.group) == (key.permissions, key.owner, key.group)
    )


@dataclass(frozen=True)
class Changes:
    """What one upload command does: keys to write (with the destination each replaces, if it
    moved), keys to remove (name and destination)."""

    write: tuple[tuple[Key, str | None], ...] = ()
    remove: tuple[tuple[str, str], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.write or self.remove)


def changes_for(
    keys: Sequence[Key],
    on_machine: Mapping[str, KeyOnMachine],
    stage: Upload | None,
    declared: Sequence[str],
    *,
    again: bool = False,
) -> Changes:
    """The keys of `stage` (every stage when None) not in place (all of them with `again`),
    and, in the pre-activation stage, the keys the manifest lists that are no longer declared."""
    write = []
    for key in keys:
        if stage is not None and key.upload is not stage:
            continue
        there = on_machine.get(key.name)
        if again or not in_place(key, there):
            moved = there.destination if there and there.destination != key.destination else None
            write.append((key, moved))
    remove: list[tuple[str, str]] = []
    if stage in (Upload.PRE_ACTIVATION, None):
        remove = sorted(
            (name, there.destination) for name, there in on_machine.items() if name not in declared
        )
    return Changes(tuple(write), tuple(remove))


def plan(keys: Sequence[Key], on_machine: Mapping[str, KeyOnMachine]) -> list[str]:
    """What a deploy would do to the machine's keys, by name only, as the plan says it.

    Example: ``["would upload db-password", "would remove old-token",
    "api-token: not known (its content comes from a command, which a plan does not run)"]``
    """
    known = [key for key in keys if key.unread is None]
    changes = changes_for(known, on_machine, None, [key.name for key in keys])
    said = []
    if changes.write:
        said.append("would upload " + ", ".join(key.name for key, _ in changes.write))
    if changes.remove:
        said.append("would remove " + ", ".join(name for name, _ in changes.remove))
    said += [f"{key.name}: not known ({key.unread})" for key in keys if key.unread]
    return said or ["all in place"]


def temporary(destination: str) -> str:
    """Where a key is written before it is renamed over its destination (beside it)."""
    directory, _, name = destination.rpartition("/")
    return f"{directory}/.{name}.flakefleet-tmp"


def upload_script(changes: Changes, manifest: str = MANIFEST) -> str:
    """The one command (as root) that writes a stage's keys and removes undeclared ones.

    Its standard input holds each key's content, base64 on one line, in order. First every
    key's temporary file is made beside its destination, empty, with its final owner, group
    and mode; if an owner or group does not exist, the command prints `REFUSED` and the reason,
    removes them and exits before anything changed. Then each is filled from its line (by
    `base64`, from a pipe: the content is never in a command line) and renamed into place.
    Processes are few and shared (one chown per owner, one chmod per mode): a key costs a
    `base64` and a `mv`.
    """
    q = shlex.quote
    lines = [
        "set -u",
        f"m={q(manifest)}",
        "made=''",
        'clean() { for t in $made; do rm -f -- "$t"; done; }',
        f"refuse() {{ printf '%s%s\\n' {q(REFUSED)} \"$1\"; clean; exit 3; }}",
        "create() {  # name temporary",
        '  d=${2%/*}; [ -n "$d" ] || d=/',
        '  [ -d "$d" ] || (umask 022; mkdir -p -- "$d") || refuse "key $1: cannot create $d"',
        '  if [ -e "$2" ] || [ -L "$2" ]; then rm -f -- "$2"; fi',
        '  true > "$2" || refuse "key $1: cannot create a file in $d"',
        '  made="$made $2"',
        "}",
        "owner() {  # chown's failure: name owner group",
        '  id -u -- "$2" >/dev/null 2>&1 || refuse "key $1: its owner $2 does not exist (yet)"',
        '  refuse "key $1: its group $3 does not exist (yet)"',
        "}",
        "fill() {  # name temporary destination",
        '  IFS= read -r line || refuse "key $1: its content did not arrive"',
        '  printf \'%s\\n\' "$line" | base64 --decode > "$2" || refuse "key $1: cannot write it"',
        '  mv -f -- "$2" "$3"',
        "}",
        '[ -d "${m%/*}" ] || (umask 077; mkdir -p -- "${m%/*}")',
        "set -C; umask 777  # each file is made empty, readable by nobody, never replaced",
    ]
    for key, _ in changes.write:
        lines.append(f"create {q(key.name)} {q(temporary(key.destination))}")
    lines.append("set +C; umask 077")
    groups: dict[tuple[str, str], list[Key]] = {}
    modes: dict[int, list[Key]] = {}
    for key, _ in changes.write:
        groups.setdefault((key.owner, key.group), []).append(key)
        modes.setdefault(key.mode, []).append(key)
    for (user, group), members in groups.items():
        files = " ".join(q(temporary(key.destination)) for key in members)
        lines.append(
            f"chown -- {q(f'{user}:{group}')} {files} 2>/dev/null || "
            f"owner {q(members[0].name)} {q(user)} {q(group)}"
        )
    for mode, members in modes.items():
        files = " ".join(q(temporary(key.destination)) for key in members)
        lines.append(f"chmod {mode:04o} {files}")
    for key, moved in changes.write:
        lines.append(f"fill {q(key.name)} {q(temporary(key.destination))} {q(key.destination)}")
        if moved:
            lines.append(f"rm -f -- {q(moved)}")
    for _, destination in changes.remove:
        lines.append(f"rm -f -- {q(destination)}")
    # The manifest: every other line kept, the changed keys' lines new.
    changed = " ".join([key.name for key, _ in changes.write] + [n for n, _ in changes.remove])
    new = "".join(f"{key.name} {key.digest} {key.destination}\n" for key, _ in changes.write)
    lines += [
        f"changed=' {changed} '",
        '{ if [ -f "$m" ]; then while read -r n d p; do',
        '    case $changed in *" $n "*) ;; *) printf \'%s %s %s\\n\' "$n" "$d" "$p" ;; esac',
        '  done < "$m"; fi',
        f"  printf %s {q(new)}",
        '} > "$m.new" && mv -f -- "$m.new" "$m"',
    ]
    return "\n".join(lines)


def upload_input(changes: Changes) -> str:
    """The upload command's standard input: each key's content, base64 on one line."""
    return "".join(base64.b64encode(key.content).decode() + "\n" for key, _ in changes.write)


# -- one run ---------------------------------------------------------------------------------


class RunKeys:
    """Every selected machine's keys, checked and read once, before any machine is contacted.

    For a plan (`planning`), a key's content is read only where that changes nothing: an age
    file is decrypted, but no command runs and a generated secret not yet generated is not
    made; such a key is kept with the reason (`Key.unread`) and no digest.
    """

    def __init__(self, root: Path, *, planning: bool = False) -> None:
        self.root = root
        self.planning = planning
        self.machines: dict[str, tuple[Key, ...]] = {}
        self._secret = digest_key(root)
        self._contents: dict[tuple[str, ...], bytes] = {}  # an age file shared by machines
        self._var_paths: Mapping[str, Path] = {}

    def add(
        self,
        machine: str,
        found: Sequence[tuple[str, Mapping[str, Any]]],
        identity: str | None,
        *,
        root_group: str = "root",
        var_paths: Mapping[str, Path] | None = None,
    ) -> None:
        """Check and read one machine's keys (`var_paths`: each generated secret file's
        ``<generator>/<file>`` and where it is stored); raises KeyProblem on the first problem."""
        self._var_paths = var_paths or {}
        keys = []
        for name, declared in merge(machine, found).items():
            spec, content_field = parse(machine, name, declared, root_group=root_group)
            origin = declared.origin(content_field)
            unread = self._unread(content_field, spec[content_field])
            try:
                content = (
                    b""
                    if unread
                    else self._content(machine, content_field, spec[content_field], identity)
                )
            except ContentError as error:
                raise KeyProblem(machine, name, origin, str(error), content_field) from None
            key = Key(
                name=name,
                destination=spec["destination"],
                owner=spec["owner"],
                group=spec["group"],
                mode=spec["mode"],
                upload=spec["upload"],
                origin=declared.origin(),
                content=content,
                unread=unread,
            )
            keys.append(key if unread else replace(key, digest=digest(self._secret, key)))
        destinations = [key.destination for key in keys]
        for key in keys:
            if destinations.count(key.destination) > 1:
                raise KeyProblem(
                    machine, key.name, key.origin, f"{key.destination} is another key's too",
                    "destination",
                )  # fmt: skip
        self.machines[machine] = tuple(sorted(keys, key=lambda key: key.name))

    def _unread(self, kind: str, value: str) -> str | None:
        """Why a plan leaves this content unread (None: it is read)."""
        if not self.planning:
            return None
        if kind == "command":
            return "its content comes from a command, which a plan does not run"
        if kind == "var" and not (value in self._var_paths and self._var_paths[value].exists()):
            return "its generated secret is not generated yet"
        return None

    def _content(self, machine: str, kind: str, value: str, identity: str | None) -> bytes:
        if kind == "command":
            return command_output(value, machine, self.root)
        if identity is None:
            raise ContentError(
                f"{'a generated secret' if kind == 'var' else 'an age file'} needs the setting "
                "'age_identity' (the operator's age identity file)"
            )
        if kind == "var":
            if value not in self._var_paths:
                raise ContentError(f"no generator makes a secret file {value!r}")
            path = self._var_paths[value]
        else:
            path = self.root / value
        identity_path = self.root / os.path.expanduser(identity)
        cached = (str(path.resolve()), str(identity_path))
        if cached not in self._contents:
            self._contents[cached] = decrypt(path, identity_path)
        return self._contents[cached]


def check_run(
    root: Path,
    machines: Sequence[tuple[str, Sequence[tuple[str, Mapping[str, Any]]], str | None, str]],
    var_paths: Mapping[str, Mapping[str, Path]] | None = None,
    *,
    planning: bool = False,
) -> RunKeys:
    """Check and read every machine's keys (name, data layers, `age_identity`, the group
    root's files belong to there; `var_paths` by machine, see `RunKeys.add`; `planning`, see
    `RunKeys`); raises KeysInvalid with every machine's first problem."""
    keys = RunKeys(root, planning=planning)
    errors = []
    for machine, found, identity, root_group in machines:
        try:
            keys.add(machine, found, identity, root_group=root_group,
                     var_paths=(var_paths or {}).get(machine))  # fmt: skip
        except KeyProblem as error:
            errors.append(error)
    if errors:
        raise KeysInvalid(errors)
    return keys
