"""Machine identities on the test fleet: the recipients file from the known hosts, agenix-style
age files re-encrypted to their machines' host keys (each machine's real private host key
decrypts its own), .sops.yaml rules, and a machine whose host key changed (it is given a new
one, as a reinstall would) refused until the recipients are updated.

The tests run in order on one fleet, in a scratch repository's `secrets/` (the worktree's
`secrets/` is not touched: the settings point elsewhere).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import Fleet, fleet_of, host_private_key

from flakefleet.recipients import fingerprint, ssh_to_age

MACHINES = ("web1", "web2", "db1")


@pytest.fixture(scope="module")
def fleet(flake: Path) -> Iterator[Fleet]:
    with fleet_of(flake, *MACHINES) as testbed:
        yield testbed


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The operator's identity, and two agenix-style secrets encrypted to the operator only."""
    directory = tmp_path_factory.mktemp("secrets")
    identity = directory / "operator.txt"
    subprocess.run(["age-keygen", "-o", str(identity)], check=True, capture_output=True)
    admin = subprocess.run(
        ["age-keygen", "-y", str(identity)], capture_output=True, text=True, check=True
    ).stdout.strip()
    for name, text in (("web-token.age", b"web-secret"), ("db-password.age", b"db-secret")):
        subprocess.run(["age", "-r", admin, "-o", str(directory / name)], input=text, check=True)
    (directory / "recipients.yaml").write_text(yaml.safe_dump({"admins": {"operator": admin}}))
    (directory / "rules.yaml").write_text("web-token.age: [web]\ndb-password.age: [db1]\n")
    return {"dir": directory, "identity": identity, "admin": admin}


def settings(repo: dict) -> tuple[str, ...]:
    directory = repo["dir"]
    return (
        "--data", f"recipients_file={directory}/recipients.yaml",
        "--data", f"secrets_rules={directory}/rules.yaml",
        "--data", f"sops_config={directory}/.sops.yaml",
        "--data", f"age_identity={repo['identity']}",
    )  # fmt: skip


def host_public_key(fleet: Fleet, machine: str) -> str:
    public = host_private_key(fleet, machine).with_name("ssh_host_ed25519_key.pub")
    return " ".join(public.read_text().split()[:2])


def decrypts(file: Path, identity: Path) -> bool:
    completed = subprocess.run(["age", "-d", "-i", str(identity), str(file)], capture_output=True)
    return completed.returncode == 0


def test_recipients_come_from_the_known_hosts_and_secrets_are_reencrypted(fleet, flake, repo):
    result = fleet.deploy(flake, *settings(repo), deploy_file="deploy/recipients.py")
    assert result.returncode == 0, result.output
    written = yaml.safe_load((repo["dir"] / "recipients.yaml").read_text())
    assert written["machines"] == {m: host_public_key(fleet, m) for m in MACHINES}
    assert written["admins"] == {"operator": repo["admin"]}
    web, db = repo["dir"] / "web-token.age", repo["dir"] / "db-password.age"
    assert "re-encrypted" in result.output
    for file, readers in ((web, {"web1", "web2"}), (db, {"db1"})):
        for machine in MACHINES:
            assert decrypts(file, host_private_key(fleet, machine)) == (machine in readers)
        assert decrypts(file, repo["identity"])
    sops = yaml.safe_load((repo["dir"] / ".sops.yaml").read_text())["creation_rules"]
    rules = {rule["path_regex"]: rule["age"].split(",") for rule in sops}
    web1 = ssh_to_age(host_public_key(fleet, "web1"))
    assert rules[f"^{repo['dir']}/web1/"] == [repo["admin"], web1]
    assert web1 in rules[f"^{repo['dir']}/roles/web/"]


def test_a_second_run_leaves_every_file_byte_for_byte(fleet, flake, repo):
    files = [*sorted(repo["dir"].glob("*.age")), repo["dir"] / ".sops.yaml"]
    before = {file: file.read_bytes() for file in files}
    result = fleet.deploy(flake, *settings(repo), deploy_file="deploy/recipients.py")
    assert result.returncode == 0, result.output
    assert {file: file.read_bytes() for file in files} == before
    assert "up to date" in result.output


def test_a_changed_host_key_is_refused_until_the_secrets_follow(fleet, flake, repo):
    old_key = host_private_key(fleet, "web1")
    old_public = host_public_key(fleet, "web1")
    kept = old_key.with_name("old-host-key")
    kept.write_bytes(old_key.read_bytes())
    fleet.testbed("stop", "web1")  # reinstalled: a new host key, which the known hosts learn
    old_key.unlink()
    fleet.testbed("up", "--roster", str(flake / "hosts.json"))
    new_public = host_public_key(fleet, "web1")
    assert new_public != old_public
    sessions = {machine: fleet.sessions(machine) for machine in MACHINES}

    refused = fleet.deploy(flake, *settings(repo))

    assert refused.returncode != 0
    lines = [line for line in refused.output.splitlines() if line.startswith("flakefleet: ")]
    assert lines == [
        f"flakefleet: web1: host key changed since {repo['dir']}/recipients.yaml was written "
        f"(there {fingerprint(old_public)}, known hosts now {fingerprint(new_public)}): its "
        "secrets are encrypted to the old one; run deploy/recipients.py"
    ], refused.output
    assert {m: fleet.sessions(m) for m in MACHINES} == sessions  # none contacted

    db_before = (repo["dir"] / "db-password.age").read_bytes()
    update = fleet.deploy(flake, *settings(repo), deploy_file="deploy/recipients.py")
    assert update.returncode == 0, update.output
    web = repo["dir"] / "web-token.age"
    assert decrypts(web, host_private_key(fleet, "web1")) and not decrypts(web, kept)
    assert decrypts(web, host_private_key(fleet, "web2"))
    assert (repo["dir"] / "db-password.age").read_bytes() == db_before  # web1 does not read it

    deployed = fleet.deploy(flake, *settings(repo))
    assert deployed.returncode == 0, deployed.output
