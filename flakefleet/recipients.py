"""Machine identities for secrets machines decrypt themselves (agenix, sops-nix).

A machine decrypts its secrets at activation with its SSH host key, so the repository's
secrets must be encrypted to it. The fleet's recipients live in one file in the repository
(`recipients_file`, default ``secrets/recipients.yaml``)::

    machines:            # written by deploy/recipients.py from the known hosts ssh trusts
      web1: ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI...
    admins:              # kept as written: who else may decrypt everything
      alice: age1...

From it and a rules file (`secrets_rules`, default ``secrets/rules.yaml``: each age file,
relative to the rules file, with the machines and roles that may read it)::

    web-token.age: [web]          # every machine with the role web
    db-password.age: [db1, web1]

deploy/recipients.py re-encrypts each age file whose recipients are not those (as `agenix -r`
does, but with the plaintext only in memory and pipes, and leaving a file whose recipients are
right byte for byte unchanged), and writes a `.sops.yaml` creation rule per machine and role
(`sops_config`) with each host key converted to an X25519 age recipient, as `ssh-to-age` does.
A deploy refuses a machine whose host key in the known hosts differs from the recipients file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from flakefleet.keys import ContentError, decrypt

LOCK = ".recipients.lock"  # beside the recipients file: each file's ciphertext and recipients

# -- ssh-to-age: an Ed25519 public key as an X25519 age recipient --------------------------------

P = 2**255 - 19
D = (-121665 * pow(121666, P - 2, P)) % P
CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"


class RecipientError(ValueError):
    """A key or file that cannot be used; the message names it."""


def ssh_key_blob(line: str) -> bytes:
    """The wire form of an ``ssh-ed25519 AAAA...`` public key (what its fingerprint hashes)."""
    parts = line.split()
    if len(parts) < 2 or parts[0] != "ssh-ed25519":
        raise RecipientError(f"not an ssh-ed25519 public key: {line[:40]!r}")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except ValueError as error:
        raise RecipientError(f"bad base64 in ssh key: {error}") from None
    kind, rest = _ssh_string(blob)
    point, rest = _ssh_string(rest)
    if kind != b"ssh-ed25519" or len(point) != 32 or rest:
        raise RecipientError("malformed ssh-ed25519 key")
    return blob


def _ssh_string(data: bytes) -> tuple[bytes, bytes]:
    if len(data) < 4:
        raise RecipientError("malformed ssh key")
    (length,) = struct.unpack(">I", data[:4])
    return data[4 : 4 + length], data[4 + length :]


def ssh_to_age(line: str) -> str:
    """The age recipient of an Ed25519 SSH public key: the Montgomery form u = (1 + y)/(1 - y)
    of its Edwards point, bech32 with the prefix ``age`` (ssh-to-age's convert.go)."""
    point = _ssh_string(_ssh_string(ssh_key_blob(line))[1])[0]
    y = int.from_bytes(point, "little") & ((1 << 255) - 1)
    if y >= P:
        raise RecipientError("ssh-ed25519 key is not a point on the curve")
    # On the curve: x^2 = (y^2 - 1) / (d y^2 + 1) must be a square mod p.
    x2 = (y * y - 1) * pow(D * y * y + 1, P - 2, P) % P
    if x2 and pow(x2, (P - 1) // 2, P) != 1:
        raise RecipientError("ssh-ed25519 key is not a point on the curve")
    if (point[31] >> 7) and x2 == 0:
        raise RecipientError("ssh-ed25519 key is not a point on the curve")
    u = (1 + y) * pow(1 - y, P - 2, P) % P
    return bech32("age", u.to_bytes(32, "little"))


def bech32(prefix: str, data: bytes) -> str:
    """BIP 173 bech32, without its length limit (as age uses it)."""
    words, accumulator, bits = [], 0, 0
    for byte in data:
        accumulator, bits = (accumulator << 8) | byte, bits + 8
        while bits >= 5:
            bits -= 5
            words.append((accumulator >> bits) & 31)
    if bits:
        words.append((accumulator << (5 - bits)) & 31)
    values = [ord(c) >> 5 for c in prefix] + [0] + [ord(c) & 31 for c in prefix]
    polymod = _polymod([*values, *words, 0, 0, 0, 0, 0, 0]) ^ 1
    checksum = [(polymod >> 5 * (5 - i)) & 31 for i in range(6)]
    return prefix + "1" + "".join(CHARSET[w] for w in words + checksum)


def _polymod(values: Sequence[int]) -> int:
    generator = [0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3]
    checksum = 1
    for value in values:
        top = checksum >> 25
        checksum = (checksum & 0x1FFFFFF) << 5 ^ value
        for i in range(5):
            checksum ^= generator[i] if (top >> i) & 1 else 0
    return checksum


def fingerprint(line: str) -> str:
    """``SHA256:...`` as `ssh-keygen -l` shows it."""
    digest = hashlib.sha256(ssh_key_blob(line)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def age_tag(line: str) -> str:
    """The tag an age file's ssh-ed25519 stanza names its recipient by (agessh.go)."""
    return base64.b64encode(hashlib.sha256(ssh_key_blob(line)).digest()[:4]).decode().rstrip("=")


# -- the known hosts, the recipients file, the rules -------------------------------------------


def known_host_key(known_hosts: str, address: str, port: int | None) -> str | None:
    """The ssh-ed25519 key the known hosts file holds for a machine (hashed entries too)."""
    host = f"[{address}]:{port}" if port and port != 22 else address
    completed = subprocess.run(
        ["ssh-keygen", "-F", host, "-f", known_hosts], capture_output=True, text=True, check=False
    )
    for line in completed.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] == "ssh-ed25519":
            return f"{parts[1]} {parts[2]}"
    return None


@dataclass
class Recipients:
    """The recipients file: each machine's host key, each admin's age recipient."""

    machines: dict[str, str]
    admins: dict[str, str]

    @classmethod
    def read(cls, path: Path) -> Recipients:
        if not path.exists():
            return cls({}, {})
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, Mapping):
            raise RecipientError(f"{path}: expected 'machines' and 'admins' mappings")
        machines, admins = data.get("machines") or {}, data.get("admins") or {}
        for section, values in (("machines", machines), ("admins", admins)):
            if not isinstance(values, Mapping) or not all(
                isinstance(v, str) for v in values.values()
            ):
                raise RecipientError(f"{path}: '{section}' must map names to keys")
        return cls({str(k): v for k, v in machines.items()}, {str(k): v for k, v in admins.items()})

    def write(self, path: Path) -> bool:
        """Write the file if its content changes; whether it did."""
        text = (
            "# Written by deploy/recipients.py: each machine's SSH host key (from the known hosts\n"
            "# the fleet trusts). Admins are kept as written.\n"
            + yaml.safe_dump(
                {"machines": dict(sorted(self.machines.items())), "admins": self.admins},
                sort_keys=False,
                width=200,
            )
        )
        if path.exists() and path.read_text() == text:
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return True


def rules(path: Path, machines: Mapping[str, Sequence[str]]) -> dict[Path, list[str]]:
    """Each age file (absolute) with the machines that may read it. `machines` maps each
    machine to its roles; a rule names machines or roles."""
    if not path.exists():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, Mapping):
        raise RecipientError(f"{path}: expected a mapping of age files to machines and roles")
    found = {}
    for file, names in data.items():
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise RecipientError(f"{path}, {file!r}: expected a list of machines and roles")
        readers = set()
        for name in names:
            matched = [m for m, roles in machines.items() if name == m or name in roles]
            if not matched:
                raise RecipientError(f"{path}, {file!r}: {name!r} is no machine or role")
            readers.update(matched)
        found[path.parent / str(file)] = sorted(readers)
    return found


def header_recipients(path: Path) -> tuple[set[str], int, int]:
    """An age file's recipient stanzas: the ssh-ed25519 tags, how many X25519, how many else."""
    tags: set[str] = set()
    x25519 = others = 0
    with path.open("rb") as file:
        if file.readline().strip() != b"age-encryption.org/v1":
            return tags, 0, 1  # armored or not age: re-encrypt
        for raw in file:
            line = raw.decode(errors="replace").strip()
            if line.startswith("---"):
                break
            if line.startswith("-> "):
                words = line.split()
                if words[1] == "ssh-ed25519" and len(words) > 2:
                    tags.add(words[2])
                elif words[1] == "X25519":
                    x25519 += 1
                else:
                    others += 1
    return tags, x25519, others


@dataclass(frozen=True)
class Rekeyed:
    file: Path
    changed: bool


def rekey(
    files: Mapping[Path, list[str]], recipients: Recipients, identity: Path, lock_path: Path
) -> list[Rekeyed]:
    """Re-encrypt each file whose recipients are not its machines' host keys and the admins';
    a file already right is left byte for byte. Raises RecipientError naming the file."""
    lock = json.loads(lock_path.read_text()) if lock_path.exists() else {}
    done = []
    for file, readers in sorted(files.items()):
        missing = [m for m in readers if m not in recipients.machines]
        if missing:
            raise RecipientError(f"{file}: no host key for {', '.join(missing)}")
        keys = sorted(recipients.admins.values()) + sorted(recipients.machines[m] for m in readers)
        wanted = hashlib.sha256("\n".join(keys).encode()).hexdigest()
        name = os.path.relpath(file, lock_path.parent)
        if not file.exists():
            raise RecipientError(f"{file} does not exist")
        ciphertext = hashlib.sha256(file.read_bytes()).hexdigest()
        entry = lock.get(name, {})
        if entry.get("ciphertext") == ciphertext:
            right = entry.get("recipients") == wanted
        else:  # made or edited elsewhere (agenix -e): its header says whom to
            tags, x25519, others = header_recipients(file)
            right = (tags, x25519, others) == (
                {age_tag(recipients.machines[m]) for m in readers},
                len(recipients.admins),
                0,
            )
        if not right:
            try:
                plaintext = decrypt(file, identity)
            except ContentError as error:
                raise RecipientError(str(error)) from None
            arguments = [word for key in keys for word in ("--recipient", key)]
            completed = subprocess.run(
                ["age", "--encrypt", *arguments], input=plaintext, capture_output=True, check=False
            )
            if completed.returncode != 0:
                raise RecipientError(f"{file}: age --encrypt failed: {completed.stderr.decode()}")
            partial = file.with_name(f".{file.name}.partial")
            partial.write_bytes(completed.stdout)
            partial.replace(file)
            ciphertext = hashlib.sha256(completed.stdout).hexdigest()
        lock[name] = {"ciphertext": ciphertext, "recipients": wanted}
        done.append(Rekeyed(file, not right))
    lock_path.write_text(json.dumps(lock, indent=2, sort_keys=True) + "\n")
    return done


def sops_config(recipients: Recipients, roles: Mapping[str, Sequence[str]], root: str) -> str:
    """`.sops.yaml`: a creation rule per machine (``<root>/<machine>/``) and per role
    (``<root>/roles/<role>/``), each with the admins' and those machines' age recipients."""
    admins = sorted(recipients.admins.values())
    rules_list = []
    for machine, key in sorted(recipients.machines.items()):
        rules_list.append(
            {"path_regex": f"^{root}/{machine}/", "age": ",".join([*admins, ssh_to_age(key)])}
        )
    members: dict[str, list[str]] = {}
    for machine, machine_roles in roles.items():
        for role in machine_roles:
            if machine in recipients.machines:
                members.setdefault(role, []).append(ssh_to_age(recipients.machines[machine]))
    for role, keys in sorted(members.items()):
        rules_list.append(
            {"path_regex": f"^{root}/roles/{role}/", "age": ",".join([*admins, *sorted(keys)])}
        )
    return (
        "# Written by flakefleet (deploy/recipients.py) from the recipients file; then run\n"
        "# `sops updatekeys FILE` for each secret.\n"
        + yaml.safe_dump({"creation_rules": rules_list}, sort_keys=False, width=1000)
    )
