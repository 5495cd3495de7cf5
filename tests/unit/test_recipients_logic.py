"""Machine identities: ssh-to-age's conversion against its published vectors (the key files of
its tests, github.com/Mic92/ssh-to-age cmd/ssh-to-age/test-assets at 2643a7f, and the outputs
its README shows for them), cross-checked with real age; age's stanza tags; the rules; and
re-encryption that leaves right files byte for byte."""

from __future__ import annotations

import base64
import hashlib
import struct
import subprocess
from pathlib import Path

import pytest

from flakefleet import recipients

VECTORS = Path(__file__).parent / "vectors"
# ssh-to-age's README: `ssh-to-age -i id_ed25519.pub`, `-private-key -i id_ed25519`, and
# `ssh-keyscan eve.thalheim.io eva.thalheim.io | ssh-to-age`.
PUBLIC = "age17044m9wgakla6pzftf4srtl3h5mcsr85jysgt5fg23zpnta8sfdqhzn452"
PRIVATE = "AGE-SECRET-KEY-1K3VN4N03PTHJWSJSCCMQCN33RY5FSKQPJ4KRRTG3JMQUYE0TUSEQEDH6V8"
SCANNED = {
    "eve.thalheim.io": "age1hjm3aujg9e79f5yth8a2cejzdjg5n9vnu96l05p70uvfpeltnpms7yy3pp",
    "eva.thalheim.io": "age1v8zjc47jmlqwefyu66s0d4ke98qr4vnuj3cpvs4z9npfdw833dxqwjrhzv",
}


def test_public_keys_convert_as_ssh_to_age_does():
    assert recipients.ssh_to_age((VECTORS / "ssh-to-age-id_ed25519.pub").read_text()) == PUBLIC
    scanned = {}
    for line in (VECTORS / "ssh-to-age-keyscan.txt").read_text().splitlines():
        host, *key = line.split()
        if key and key[0] == "ssh-ed25519":
            scanned[host] = recipients.ssh_to_age(" ".join(key))
    assert scanned == SCANNED


def private_to_age(openssh: str) -> str:
    """ssh-to-age -private-key, written here for the cross-check: sha512(seed)[:32]."""
    body = "".join(line for line in openssh.splitlines() if not line.startswith("-----"))
    blob = base64.b64decode(body)
    assert blob.startswith(b"openssh-key-v1\0")
    rest = blob[len(b"openssh-key-v1\0") :]
    fields = []
    for _ in range(3):  # cipher, kdf, kdf options
        (length,) = struct.unpack(">I", rest[:4])
        fields.append(rest[4 : 4 + length])
        rest = rest[4 + length :]
    assert fields[0] == b"none"
    rest = rest[4:]  # number of keys
    (length,) = struct.unpack(">I", rest[:4])
    rest = rest[4 + length :]  # the public key
    private = rest[4:]
    private = private[8:]  # check integers
    (length,) = struct.unpack(">I", private[:4])
    private = private[4 + length :]  # key type
    (length,) = struct.unpack(">I", private[:4])
    private = private[4 + length :]  # public point
    secret = private[4 : 4 + 64]
    scalar = hashlib.sha512(secret[:32]).digest()[:32]
    return recipients.bech32("age-secret-key-", scalar).upper()


def test_the_private_half_agrees_with_age_itself():
    """The README's private key for the same key file, and `age-keygen -y` of it (age's own
    X25519) gives our public conversion."""
    identity = private_to_age((VECTORS / "ssh-to-age-id_ed25519").read_text())
    assert identity == PRIVATE
    derived = subprocess.run(
        ["age-keygen", "-y"], input=identity + "\n", capture_output=True, text=True, check=True
    ).stdout.strip()
    assert derived == PUBLIC


def test_a_key_off_the_curve_or_not_ed25519_is_refused():
    blob = base64.b64decode((VECTORS / "ssh-to-age-id_ed25519.pub").read_text().split()[1])
    off = blob[:-32] + (2).to_bytes(32, "little")  # y = 2 is on no point of the curve
    with pytest.raises(recipients.RecipientError, match="not a point"):
        recipients.ssh_to_age("ssh-ed25519 " + base64.b64encode(off).decode())
    with pytest.raises(recipients.RecipientError, match="not an ssh-ed25519"):
        recipients.ssh_to_age("ssh-rsa AAAAB3NzaC1yc2E")


@pytest.fixture
def operator(tmp_path: Path) -> tuple[Path, str]:
    identity = tmp_path / "operator.txt"
    subprocess.run(["age-keygen", "-o", str(identity)], check=True, capture_output=True)
    public = subprocess.run(
        ["age-keygen", "-y", str(identity)], capture_output=True, text=True, check=True
    ).stdout.strip()
    return identity, public


def host_key(tmp_path: Path, name: str) -> tuple[Path, str]:
    path = tmp_path / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path, " ".join(path.with_suffix(".pub").read_text().split()[:2])


def test_the_stanza_tag_is_the_one_age_writes(tmp_path):
    _, key = host_key(tmp_path, "web1")
    secret = tmp_path / "s.age"
    subprocess.run(["age", "-r", key, "-o", str(secret)], input=b"x", check=True)
    tags, x25519, others = recipients.header_recipients(secret)
    assert (tags, x25519, others) == ({recipients.age_tag(key)}, 0, 0)


def test_rules_name_machines_and_roles(tmp_path):
    (tmp_path / "rules.yaml").write_text("a.age: [web]\nb.age: [db1, web1]\nc.age: [nope]\n")
    with pytest.raises(recipients.RecipientError, match=r"'c.age': 'nope' is no machine or role"):
        recipients.rules(tmp_path / "rules.yaml", {"web1": ["web"], "db1": ["db"]})
    (tmp_path / "rules.yaml").write_text("a.age: [web]\nb.age: [db1, web1]\n")
    found = recipients.rules(tmp_path / "rules.yaml", {"web1": ["web"], "web2": ["web"],
                                                      "db1": ["db"]})  # fmt: skip
    assert found == {tmp_path / "a.age": ["web1", "web2"], tmp_path / "b.age": ["db1", "web1"]}


def decrypts(file: Path, identity: Path) -> bool:
    return subprocess.run(["age", "-d", "-i", str(identity), str(file)],
                          capture_output=True).returncode == 0  # fmt: skip


def test_rekey_encrypts_to_readers_and_admins_and_leaves_right_files_alone(tmp_path, operator):
    identity, admin = operator
    web1_private, web1 = host_key(tmp_path, "web1")
    db1_private, db1 = host_key(tmp_path, "db1")
    secret = tmp_path / "web.age"
    subprocess.run(["age", "-r", admin, "-o", str(secret)], input=b"pw", check=True)
    fleet = recipients.Recipients({"web1": web1, "db1": db1}, {"alice": admin})
    lock = tmp_path / recipients.LOCK

    first = recipients.rekey({secret: ["web1"]}, fleet, identity, lock)
    assert [r.changed for r in first] == [True]
    assert decrypts(secret, web1_private) and decrypts(secret, identity)
    assert not decrypts(secret, db1_private)

    before = secret.read_bytes()
    again = recipients.rekey({secret: ["web1"]}, fleet, identity, lock)
    assert [r.changed for r in again] == [False] and secret.read_bytes() == before
    lock.unlink()  # no record: the header alone says the recipients are right
    assert [r.changed for r in recipients.rekey({secret: ["web1"]}, fleet, identity, lock)] == [
        False
    ]
    assert secret.read_bytes() == before

    _, new_web1 = host_key(tmp_path, "web1-new")  # web1 reinstalled
    moved = recipients.Recipients({"web1": new_web1, "db1": db1}, {"alice": admin})
    assert [r.changed for r in recipients.rekey({secret: ["web1"]}, moved, identity, lock)] == [
        True
    ]
    assert decrypts(secret, tmp_path / "web1-new") and not decrypts(secret, web1_private)


def test_sops_rules_per_machine_and_role(operator):
    _, admin = operator
    key = (VECTORS / "ssh-to-age-id_ed25519.pub").read_text()
    fleet = recipients.Recipients({"web1": " ".join(key.split()[:2])}, {"alice": admin})
    text = recipients.sops_config(fleet, {"web1": ["web"]}, "secrets")
    assert f"path_regex: ^secrets/web1/\n  age: {admin},{PUBLIC}\n" in text
    assert f"path_regex: ^secrets/roles/web/\n  age: {admin},{PUBLIC}\n" in text
