"""Generated vars (clan's model) on the test fleet: a generator chain with a dependency and a
shared generator, stored encrypted to each machine's real host key and the admin, deployed as
keys; nothing regenerated on a second run; a regenerate and what depends on it; a cycle; a
prompt asked on the terminal.

web1 and web2 (both role web); the tests run in order on one fleet.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
import yaml
from conftest import BIN, ROOT, Fleet, Hidden, fleet_of, host_private_key

MACHINES = ("web1", "web2")
GENERATORS = {
    "ssh-host": {
        "files": {"key": {}, "key.pub": {"secret": False}},
        "script": 'ssh-keygen -q -t ed25519 -N "" -C "root@$FLAKEFLEET_MACHINE" -f $out/key',
    },
    "wireguard": {
        "files": {"private": {"secret": True}, "public": {"secret": False}},
        "script": "openssl genpkey -algorithm x25519 -out $out/private && "
        "openssl pkey -in $out/private -pubout -out $out/public",
    },
    "api-token": {"files": {"token": {}}, "share": True,
                  "script": "openssl rand -hex 16 > $out/token"},
    "app-env": {
        "files": {"env": {}},
        "dependencies": ["api-token", "wireguard"],
        "script": "printf 'TOKEN=%s\\nPUB=%s\\n' \"$(cat $in/api-token/token)\" "
        "\"$(sed -n 2p $in/wireguard/public)\" > $out/env",
    },
}  # fmt: skip


@pytest.fixture(scope="module")
def fleet(flake: Path) -> Iterator[Fleet]:
    with fleet_of(flake, *MACHINES) as testbed:
        yield testbed


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    directory = tmp_path_factory.mktemp("vars")
    identity = directory / "operator.txt"
    subprocess.run(["age-keygen", "-o", str(identity)], check=True, capture_output=True)
    admin = subprocess.run(
        ["age-keygen", "-y", str(identity)], capture_output=True, text=True, check=True
    ).stdout.strip()
    (directory / "recipients.yaml").write_text(yaml.safe_dump({"admins": {"operator": admin}}))
    return {"dir": directory, "identity": identity, "vars": directory / "vars"}


def data(repo: dict, generators: dict = GENERATORS) -> tuple[str, ...]:
    return (
        "--data", f"generators={json.dumps(generators)}",
        "--data", f"vars_dir={repo['vars']}",
        "--data", f"recipients_file={repo['dir']}/recipients.yaml",
        "--data", f"age_identity={repo['identity']}",
    )  # fmt: skip


def plain(file: Path, identity: Path) -> Hidden | None:
    completed = subprocess.run(["age", "-d", "-i", str(identity), str(file)], capture_output=True)
    return Hidden(completed.stdout) if completed.returncode == 0 else None


def on_machine(fleet: Fleet, machine: str, path: str) -> Hidden:
    return Hidden(fleet.ssh(machine, f"cat {path}").encode() + b"\n")


def snapshot(repo: dict) -> dict[str, bytes]:
    return {
        str(path.relative_to(repo["vars"])): path.read_bytes()
        for path in sorted(repo["vars"].rglob("*"))
        if path.is_file()
    }


def test_generators_run_in_order_are_stored_encrypted_and_deployed(fleet, flake, repo):
    result = fleet.deploy(flake, *data(repo))
    assert result.returncode == 0, result.output
    stored = sorted(snapshot(repo))
    assert stored == sorted([
        "shared/api-token/token.age",
        *(f"{m}/{path}" for m in MACHINES for path in
          ("wireguard/private.age", "wireguard/public", "app-env/env.age", "ssh-host/key.age",
           "ssh-host/key.pub")),
    ])  # fmt: skip
    vars_dir, identity = repo["vars"], repo["identity"]
    token = plain(vars_dir / "shared/api-token/token.age", identity)
    assert token and len(token.content.strip()) == 32
    for machine in MACHINES:
        other = next(m for m in MACHINES if m != machine)
        private = vars_dir / machine / "wireguard/private.age"
        # each machine's real host key reads its own secrets and the shared one, not another's
        assert plain(private, host_private_key(fleet, machine)) == plain(private, identity)
        assert plain(private, host_private_key(fleet, other)) is None
        assert (
            plain(vars_dir / "shared/api-token/token.age", host_private_key(fleet, machine))
            == token
        )
        public = (vars_dir / machine / "wireguard/public").read_text().splitlines()[1]
        env = plain(vars_dir / machine / "app-env/env.age", identity)
        assert env == Hidden(
            b"TOKEN=" + token.content.strip() + b"\nPUB=" + public.encode() + b"\n"
        )
        # deployed as keys at /run/secrets/<generator>/<file>
        assert on_machine(fleet, machine, "/run/secrets/app-env/env") == env
        assert on_machine(fleet, machine, "/run/secrets/api-token/token") == token
        assert fleet.ssh(machine, "stat -c '%a %U' /run/secrets/wireguard/private") == "400 root"
        assert fleet.ssh(machine, "ls /run/secrets/wireguard") == "private"  # public: no key
        # the SSH host key pair: the deployed private half gives the stored public half
        public_half = fleet.ssh(machine, "ssh-keygen -y -f /run/secrets/ssh-host/key")
        stored = (vars_dir / machine / "ssh-host/key.pub").read_text().split()[:2]
        assert public_half.split()[:2] == stored


def test_a_second_run_generates_nothing(fleet, flake, repo):
    before = snapshot(repo)
    result = fleet.deploy(flake, *data(repo))
    assert result.returncode == 0, result.output
    assert snapshot(repo) == before
    assert all(result.status(m) == "unchanged" for m in MACHINES), result.report


def test_a_regenerate_runs_it_and_what_depends_on_it(fleet, flake, repo):
    before = snapshot(repo)
    result = fleet.deploy(flake, "--limit", "web1", *data(repo),
                          "--data", 'regenerate=["wireguard"]')  # fmt: skip
    assert result.returncode == 0, result.output
    after = snapshot(repo)
    changed = sorted(name for name in after if after[name] != before[name])
    assert changed == ["web1/app-env/env.age", "web1/wireguard/private.age",
                       "web1/wireguard/public"]  # fmt: skip
    assert result.report["web1"]["changed"] == ["keys"], result.report
    env = plain(repo["vars"] / "web1/app-env/env.age", repo["identity"])
    assert on_machine(fleet, "web1", "/run/secrets/app-env/env") == env


def test_a_dependency_cycle_is_named_before_anything_runs(fleet, flake, repo):
    cycle = {
        "a": {"files": {"x": {}}, "dependencies": ["b"], "script": "touch $out/x"},
        "b": {"files": {"x": {}}, "dependencies": ["a"], "script": "touch $out/x"},
    }
    sessions = {machine: fleet.sessions(machine) for machine in MACHINES}
    result = fleet.deploy(flake, *data(repo, cycle))
    assert result.returncode != 0
    lines = [line for line in result.output.splitlines() if line.startswith("flakefleet: ")]
    assert lines == [
        "flakefleet: web1, web2: generator 'a' (--data, field 'dependencies'): "
        "dependency cycle: a -> b -> a"
    ], result.output
    assert {m: fleet.sessions(m) for m in MACHINES} == sessions
    assert not (repo["vars"] / "web1" / "a").exists()


def test_a_prompt_is_asked_on_the_terminal(fleet, flake, repo):
    generators = {
        **GENERATORS,
        "root-password": {"files": {"hash": {}}, "prompts": ["password"],
                          "script": "openssl passwd -6 -salt fleet -stdin "
                                    "< $prompts/password > $out/hash"},
    }  # fmt: skip
    deploy = pexpect.spawn(
        str(BIN / "pyinfra"),
        ["-y", "inventory.py", "deploy/site.py", "--limit", "web1", "--data", f"flake={flake}",
         *data(repo, generators)],
        cwd=str(ROOT), env={**fleet.env}, encoding="utf-8", timeout=600, dimensions=(60, 250),
    )  # fmt: skip
    try:
        deploy.expect("password for root-password on web1: ")
        deploy.sendline("correct horse")
        deploy.expect(pexpect.EOF)
        transcript = deploy.before
    finally:
        deploy.close()
    assert deploy.exitstatus == 0, transcript[-3000:]
    assert "correct horse" not in transcript
    expected = subprocess.run(
        ["openssl", "passwd", "-6", "-salt", "fleet", "-stdin"], input=b"correct horse",
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    assert on_machine(fleet, "web1", "/run/secrets/root-password/hash") == Hidden(expected)


def test_another_machines_config_reads_a_public_var(fleet, flake, repo):
    """Kept in the flake's vars/ (the default), the public halves are read by the flake: each
    machine's config lists the other's WireGuard public key."""
    settings = list(data(repo))
    at = settings.index(f"vars_dir={repo['vars']}")
    del settings[at - 1 : at + 1]  # "--data", "vars_dir=..."
    result = fleet.deploy(flake, *settings)
    assert result.returncode == 0, result.output
    web2_public = (flake / "vars/web2/wireguard/public").read_text()
    assert "BEGIN PUBLIC KEY" in web2_public
    assert fleet.ssh("web1", "cat /etc/static/vpn/peers") == web2_public.strip()
    assert "switch" in result.report["web1"]["changed"], result.report


def test_a_new_host_key_gets_the_machines_vars_reencrypted(fleet, flake, repo):
    """web1 reinstalled (a new host key): deploy/recipients.py re-encrypts its vars and the
    shared ones it reads to the new key; web2's own stay byte for byte."""
    before = snapshot(repo)
    old = host_private_key(fleet, "web1")
    kept = old.with_name("old-host-key")
    kept.write_bytes(old.read_bytes())
    fleet.testbed("stop", "web1")
    old.unlink()
    fleet.testbed("up", "--roster", str(flake / "hosts.json"))

    result = fleet.deploy(flake, *data(repo), deploy_file="deploy/recipients.py")

    assert result.returncode == 0, result.output
    after = snapshot(repo)
    changed = sorted(name for name in after if after[name] != before[name])
    assert changed == ["shared/api-token/token.age", "web1/app-env/env.age",
                       "web1/root-password/hash.age", "web1/ssh-host/key.age",
                       "web1/wireguard/private.age"], changed  # fmt: skip
    for name in changed:
        assert plain(repo["vars"] / name, host_private_key(fleet, "web1")) is not None
        assert plain(repo["vars"] / name, kept) is None
    token = repo["vars"] / "shared/api-token/token.age"
    assert plain(token, host_private_key(fleet, "web2")) == plain(token, repo["identity"])
