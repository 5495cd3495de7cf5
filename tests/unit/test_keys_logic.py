"""Keys' pure logic: merging the data layers, the checks and their error lines, keyed digests,
what an upload changes, and the upload script itself run by a real shell in a scratch
directory (with real age for the content)."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from flakefleet import keys
from flakefleet.models import KeyOnMachine


def layers(*found: tuple[str, dict]) -> list[tuple[str, dict]]:
    return [(label, {"keys": value}) for label, value in found]


def test_layers_merge_by_name_field_by_field_and_content_replaces():
    merged = keys.merge(
        "web1",
        layers(
            ("group_data/all.py", {"db": {"age_file": "db.age", "owner": "postgres"},
                                   "old": {"command": "true"}}),
            ("group_data/web.py", {"db": {"command": "pass db", "mode": "0440"}, "old": None}),
        ),
    )  # fmt: skip
    assert set(merged) == {"db"}
    assert merged["db"].spec == {"command": "pass db", "owner": "postgres", "mode": "0440"}
    assert merged["db"].origin("owner") == "group_data/all.py"
    assert merged["db"].origin("command") == "group_data/web.py"


@pytest.mark.parametrize(
    ("spec", "field", "problem"),
    [
        ({"age_file": "a.age", "mode": "640"}, None, None),
        ({"age_file": "a.age", "mode": "rw"}, "mode", "expected a file mode"),
        ({"age_file": "a.age", "command": "x"}, None, "give exactly one of age_file, command"),
        ({"age_file": "a.age", "upload": "later"}, "upload", "pre-activation, post-activation"),
        ({"age_file": "a.age", "destination": "keys/a"}, "destination", "absolute file path"),
        ({"age_file": "a.age", "owner": "a b"}, "owner", "user or group name"),
        ({"age_file": "a.age", "ownr": "x"}, "ownr", "unknown field 'ownr'"),
    ],
)
def test_a_bad_field_is_one_line_naming_machine_key_layer_and_field(spec, field, problem):
    declared = keys.merge("web1", layers(("group_data/web.py", {"db": spec})))["db"]
    if problem is None:
        parsed, content = keys.parse("web1", "db", declared)
        assert (parsed["mode"], parsed["destination"], content) == (
            0o640,
            "/run/keys/db",
            "age_file",
        )
        assert (parsed["owner"], parsed["group"], parsed["upload"]) == (
            "root",
            "root",
            "pre-activation",
        )
        return
    with pytest.raises(keys.KeyProblem) as raised:
        keys.parse("web1", "db", declared)
    message = str(raised.value)
    where = f", field {field!r}" if field else ""
    assert message.startswith(f"web1: key 'db' (group_data/web.py{where}): "), message
    assert problem in message and "\n" not in message


@pytest.fixture
def identity(tmp_path: Path) -> Path:
    path = tmp_path / "identity.txt"
    subprocess.run(["age-keygen", "-o", str(path)], check=True, capture_output=True)
    return path


def encrypt_to(identity: Path, plaintext: bytes, path: Path) -> Path:
    recipient = subprocess.run(
        ["age-keygen", "-y", str(identity)], check=True, capture_output=True, text=True
    ).stdout.strip()
    subprocess.run(["age", "-r", recipient, "-o", str(path)], input=plaintext, check=True)
    return path


def test_keys_are_read_once_per_file_and_bad_files_name_file_and_machine(tmp_path, identity):
    encrypt_to(identity, b"pw", tmp_path / "db.age")
    (tmp_path / "broken.age").write_bytes((tmp_path / "db.age").read_bytes()[:-5])
    good = layers(("--data", {"db": {"age_file": "db.age"}}))
    bad = layers(("--data", {"db": {"age_file": "broken.age"}}))
    checked = keys.check_run(tmp_path, [("web1", good, str(identity), "root")])
    assert checked.machines["web1"][0].content == b"pw"
    with pytest.raises(keys.KeysInvalid) as raised:
        keys.check_run(
            tmp_path,
            [("web1", bad, str(identity), "root"), ("web2", bad, str(identity), "root"),
             ("db1", good, None, "root")],
        )  # fmt: skip
    assert raised.value.lines[0].startswith(
        "db1: key 'db' (--data, field 'age_file'): an age file needs the setting 'age_identity'"
    )
    assert raised.value.lines[1].startswith(
        f"web1, web2: key 'db' (--data, field 'age_file'): {tmp_path}/broken.age: cannot decrypt:"
    )


def test_a_plan_reads_age_files_but_runs_no_command_and_generates_nothing(tmp_path, identity):
    encrypt_to(identity, b"pw", tmp_path / "db.age")
    ran = tmp_path / "ran"
    found = layers(("--data", {"db": {"age_file": "db.age"},
                               "token": {"command": f"touch {ran}; echo t"}}),
                   ("group_data/vpn.py", {"wg": {"var": "wireguard/private"}}))  # fmt: skip
    var_paths = {"web1": {"wireguard/private": tmp_path / "vars" / "private.age"}}
    checked = keys.check_run(
        tmp_path, [("web1", found, str(identity), "root")], var_paths, planning=True
    )
    db, token, wg = checked.machines["web1"]
    assert db.content == b"pw" and db.unread is None and db.digest
    assert token.unread == "its content comes from a command, which a plan does not run"
    assert wg.unread == "its generated secret is not generated yet"
    assert (token.digest, wg.digest) == ("", "")
    assert not ran.exists()
    assert keys.plan([db, token, wg], {}) == [
        "would upload db",
        "token: not known (its content comes from a command, which a plan does not run)",
        "wg: not known (its generated secret is not generated yet)",
    ]
    keys.check_run(tmp_path, [("web1", found[:1], str(identity), "root")])
    assert ran.exists()  # a deploy runs it


def test_the_plan_of_keys_names_uploads_and_removals_only():
    db = key("db")
    there = KeyOnMachine(db.digest, db.destination, "-r--------", "root", "root")
    old = KeyOnMachine("x", "/run/keys/old", "-r--------", "root", "root")
    assert keys.plan([db], {"db": there}) == ["all in place"]
    assert keys.plan([db], {"db": there, "old": old}) == ["would remove old"]
    assert keys.plan([key("db", content=b"new")], {"db": there}) == ["would upload db"]


def key(name: str = "db", content: bytes = b"pw", **fields) -> keys.Key:
    values = {"destination": f"/run/keys/{name}", "owner": "root", "group": "root",
              "mode": 0o400, "upload": keys.Upload.PRE_ACTIVATION, "origin": "--data"}  # fmt: skip
    made = keys.Key(name=name, content=content, **{**values, **fields})
    return keys.Key(**{**made.__dict__, "digest": keys.digest(b"k" * 32, made)})


def test_the_digest_is_keyed_and_covers_where_and_how_the_key_lies():
    plain = key()
    assert plain.digest != hashlib.sha256(b"pw").hexdigest()
    assert keys.digest(b"other key", plain) != plain.digest  # unguessable without the key
    assert key(mode=0o440).digest != plain.digest
    assert key(owner="postgres").digest != plain.digest
    assert key(content=b"pw2").digest != plain.digest


def test_changes_upload_what_is_not_in_place_and_remove_what_is_undeclared():
    db, late = key("db"), key("late", upload=keys.Upload.POST_ACTIVATION)
    there = KeyOnMachine(db.digest, db.destination, "-r--------", "root", "root")
    gone = KeyOnMachine(db.digest, db.destination)  # a reboot emptied /run/keys
    old = KeyOnMachine("x", "/run/keys/old", "-r--------", "root", "root")
    pre, post = keys.Upload.PRE_ACTIVATION, keys.Upload.POST_ACTIVATION
    names = ["db", "late"]
    assert not keys.changes_for([db, late], {"db": there}, pre, names)
    assert keys.changes_for([db], {"db": gone}, pre, names).write == ((db, None),)
    chmodded = KeyOnMachine(db.digest, db.destination, "-r--r--r--", "root", "root")
    assert keys.changes_for([db], {"db": chmodded}, pre, names).write == ((db, None),)
    both = keys.changes_for([db, late], {"db": there, "old": old}, pre, names)
    assert both.write == () and both.remove == (("old", "/run/keys/old"),)
    after = keys.changes_for([db, late], {"db": there, "old": old}, post, names)
    assert after.write == ((late, None),) and after.remove == ()
    moved = key("db", destination="/etc/db")
    assert keys.changes_for([moved], {"db": there}, pre, ["db"]).write == ((moved, "/run/keys/db"),)


def test_the_manifest_and_the_listing_are_read_back():
    lines = [
        "db 1a2b /run/keys/db",
        "wg 3c4d /var/lib/wire guard/private",
        "../bad 00 /x",
        keys.LISTING,
        "-r--r-----. 1 postgres postgres 12 Dec  1 04:50 /run/keys/db",
    ]
    assert keys.parse_manifest(lines) == {
        "db": KeyOnMachine("1a2b", "/run/keys/db", "-r--r-----", "postgres", "postgres"),
        "wg": KeyOnMachine("3c4d", "/var/lib/wire guard/private"),  # missing
    }
    assert key(mode=0o640).permissions == "-rw-r-----"


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")


def run_upload(changes: keys.Changes, manifest: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", "-c", keys.upload_script(changes, str(manifest))],
        input=keys.upload_input(changes), capture_output=True, text=True, check=False,
    )  # fmt: skip


@needs_root
def test_the_upload_script_writes_exact_files_and_removes_old_ones(tmp_path):
    binary = bytes(range(256)) * 3
    one = key("one", destination=f"{tmp_path}/keys/one", owner="nobody", mode=0o440)
    two = key("two", content=binary, destination=f"{tmp_path}/deep/er/two")
    (tmp_path / "old").write_text("old")
    changes = keys.Changes(((one, None), (two, None)), (("old", f"{tmp_path}/old"),))
    completed = run_upload(changes, tmp_path / "manifest")
    assert completed.returncode == 0, completed.stderr
    assert (tmp_path / "keys/one").read_bytes() == b"pw"
    assert (tmp_path / "deep/er/two").read_bytes() == binary
    stat = (tmp_path / "keys/one").stat()
    assert (stat.st_mode & 0o7777, stat.st_uid) == (0o440, int(subprocess.check_output(
        ["id", "-u", "nobody"])))  # fmt: skip
    assert not (tmp_path / "old").exists()
    assert sorted(os.listdir(tmp_path / "keys")) == ["one"]  # no temporary file left
    found = subprocess.run(
        ["sh", "-c", keys.manifest_script(str(tmp_path / "manifest"))],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    manifest = keys.parse_manifest(found)
    assert manifest["one"] == KeyOnMachine(one.digest, one.destination, "-r--r-----", "nobody",
                                           "root")  # fmt: skip
    assert keys.in_place(two, manifest["two"]) and keys.in_place(one, manifest["one"])


@needs_root
def test_an_owner_that_does_not_exist_changes_nothing(tmp_path):
    one = key("one", destination=f"{tmp_path}/one")
    ghost = key("ghost", destination=f"{tmp_path}/ghost", owner="no-such-user-xyz")
    (tmp_path / "old").write_text("old")
    changes = keys.Changes(((one, None), (ghost, None)), (("old", f"{tmp_path}/old"),))
    completed = run_upload(changes, tmp_path / "manifest")
    assert completed.returncode != 0
    assert completed.stdout.strip() == (
        f"{keys.REFUSED}key ghost: its owner no-such-user-xyz does not exist (yet)"
    )
    assert sorted(os.listdir(tmp_path)) == ["old"]  # nothing written, nothing removed
