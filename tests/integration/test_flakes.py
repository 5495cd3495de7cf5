"""Flakes with inputs on the test fleet: a private input only the controller may fetch, built
on the machine and on a builder; the lock file used as it is; overrides; a machine deployed
from another flake attribute; a forge token that never shows.

The tests run in order on one fleet.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import NIX, ROOT, evaluate, locked_real_flake, needs_real_nix

from flakefleet.fleet import load_fleet

REPOSITORY = "/var/lib/git/private.git"  # on vpn1
AUTHORIZED_KEYS = "/etc/ssh/testbed/authorized_keys"  # every user's, on a test machine


def build(fleet, flake: Path, *args: str):
    return fleet.deploy(flake, "--data", "goal=build", *args)


def git(directory: Path, *args: str, env: dict[str, str] | None = None) -> None:
    subprocess.run(
        ["git", "-C", str(directory), "-c", "user.name=t", "-c", "user.email=t@t", *args],
        check=True, capture_output=True, env=env,
    )  # fmt: skip


def with_private_input(flake: Path) -> None:
    """The example flake with a private input (seed 003's services), linked into every NixOS
    system (environment.systemPackages)."""
    text = (flake / "flake.nix").read_text()
    outputs = "outputs = { self }:"
    hosts = "hosts = builtins.fromJSON (builtins.readFile ./hosts.json);"
    assert outputs in text and hosts in text
    text = text.replace(
        outputs,
        'inputs.private = { url = "git+ssh://root@vpn1' + REPOSITORY + '?ref=main"; '
        "flake = false; };\n  outputs = { self, private }:",
    ).replace(
        hosts,
        "hosts = builtins.mapAttrs (name: host: host // { packages = [ private ]; })\n"
        "        (builtins.fromJSON (builtins.readFile ./hosts.json));",
    )
    (flake / "flake.nix").write_text(text)


def machine_port(fleet, name: str) -> int:
    port = next(m.port for m in load_fleet(fleet.fleet_file).machines if m.name == name)
    assert port is not None
    return port


def reaches_vpn1_from(fleet, machine: str) -> bool:
    """Whether a machine's root (a builder's key and known hosts) can log into vpn1."""
    port = machine_port(fleet, "vpn1")
    command = f"ssh -o BatchMode=yes -p {port} root@127.0.0.1 true; echo rc=$?"
    return fleet.ssh(machine, command, check=False).endswith("rc=0")


def test_a_private_input_builds_on_the_machine_and_on_a_builder(fleet, flake, tmp_path):
    # The private repository: a bare repository on vpn1, served over SSH to the controller's
    # key only (the builder's key is taken off vpn1's authorized keys).
    content = f"private {uuid.uuid4().hex}"
    source = tmp_path / "private"
    source.mkdir()
    (source / "motd").write_text(content + "\n")
    git(source, "init", "-q", "-b", "main")
    git(source, "add", "-A")
    git(source, "commit", "-q", "-m", "private")
    fleet.ssh("vpn1", f"git init -q --bare -b main {REPOSITORY}")
    ssh = {**os.environ, "GIT_SSH_COMMAND": f"ssh -F {fleet.state / 'ssh_config'}"}
    git(source, "push", "-q", f"ssh://root@vpn1{REPOSITORY}", "main", env=ssh)
    assert reaches_vpn1_from(fleet, "build1")  # what the next line takes away
    controller_key = subprocess.run(
        ["ssh-keygen", "-y", "-f", str(fleet.state / "keys" / "id_ed25519")],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    fleet.ssh("vpn1", f"printf '%s\\n' '{controller_key}' > {AUTHORIZED_KEYS}")
    assert not reaches_vpn1_from(fleet, "build1")
    assert not reaches_vpn1_from(fleet, "web2")

    with_private_input(flake)
    subprocess.run([*NIX, "flake", "lock", f"path:{flake}"], check=True, env=ssh)
    locked = (flake / "flake.lock").read_text()
    # The input is in the controller's store now: the deploy needs no network, so the
    # repository may be out of everyone's reach.
    fleet.ssh("vpn1", f"mv {REPOSITORY} {REPOSITORY}.away")
    systems = {m: evaluate(flake, m) for m in ("web1", "web2")}

    on_builder = build(fleet, flake, "--limit", "web1", "--data", "build_on=build1")
    on_target = build(fleet, flake, "--limit", "web2", "--data", "build_on=target")

    assert on_builder.returncode == 0, on_builder.output
    assert on_target.returncode == 0, on_target.output
    assert "built on the machine" in on_target.report["web2"]["changed"]
    for machine, system in systems.items():
        assert fleet.ssh(machine, f"cat {system}/packages/*/motd") == content
        assert not Path(system).exists(), "the controller built it"
    assert (flake / "flake.lock").read_text() == locked
    # What the machine could not have done itself: evaluate the flake it was sent.
    evaluated_there = fleet.ssh(
        "web2",
        "nix --extra-experimental-features 'nix-command flakes' eval --raw "
        "path:/var/src/config#nixosConfigurations.web2.config.system.build.toplevel.outPath "
        "2>&1; echo rc=$?",
        check=False,
    )
    assert evaluated_there.endswith("rc=1"), evaluated_there


def test_an_unlocked_input_stops_the_run_before_any_machine(fleet, flake, tmp_path):
    library = tmp_path / "library"
    library.mkdir()
    (library / "version").write_text("1\n")
    unlocked = tmp_path / "unlocked"
    shutil.copytree(flake, unlocked)
    text = (unlocked / "flake.nix").read_text()
    text = text.replace(
        "outputs = { self, private }:",
        f'inputs.library = {{ url = "path:{library}"; flake = false; }};\n'
        "  outputs = { self, private, library }:",
    )
    (unlocked / "flake.nix").write_text(text)
    locked = (unlocked / "flake.lock").read_text()
    sessions = {machine: fleet.sessions(machine) for machine in fleet.machines}

    result = build(fleet, unlocked, "--limit", "web1", "--limit", "db1")

    assert result.returncode != 0
    lines = [line for line in result.output.splitlines() if "input 'library'" in line]
    assert len(lines) == 1, result.output
    assert f"nix flake lock {unlocked}" in lines[0] and "web1" in lines[0]
    assert {machine: fleet.sessions(machine) for machine in fleet.machines} == sessions
    assert (unlocked / "flake.lock").read_text() == locked


def test_override_inputs_builds_a_local_checkout(fleet, flake, tmp_path):
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    content = f"checkout {uuid.uuid4().hex}"
    (checkout / "motd").write_text(content + "\n")
    locked = (flake / "flake.lock").read_text()
    overrides = json.dumps({"private": str(checkout)})

    result = build(fleet, flake, "--limit", "db1", "--data", f"override_inputs={overrides}")

    assert result.returncode == 0, result.output
    system = result.report["db1"]["system"]
    assert fleet.ssh("db1", f"cat {system}/packages/*/motd") == content
    assert (flake / "flake.lock").read_text() == locked


def test_a_machine_deploys_from_another_flake_attribute(fleet, flake):
    """Seed 001's devmac, deployed to the fleet's mac1."""
    hosts = json.loads((flake / "hosts.json").read_text())
    hosts["devmac"] = {**hosts["mac1"], "version": uuid.uuid4().hex[:8]}
    (flake / "hosts.json").write_text(json.dumps(hosts, indent=2))
    devmac = evaluate(flake, "devmac")
    assert devmac != evaluate(flake, "mac1")

    result = build(fleet, flake, "--limit", "mac1", "--data", "flake_attribute=devmac")

    assert result.returncode == 0, result.output
    assert result.report["mac1"]["system"] == devmac
    assert fleet.ssh("deploy@mac1", f"nix-store --check-validity {devmac} && echo ok") == "ok"


def test_a_token_read_from_a_command_never_shows(fleet, flake, tmp_path):
    """Nix gets it (access-tokens, seed 003's forge token) in its environment: not in any
    process's arguments while the run evaluates, nor in pyinfra's output at -vvv."""
    token = f"ghp_{uuid.uuid4().hex}"
    token_file = tmp_path / "token"
    token_file.write_text(f"github.com={token}\n")
    token_file.chmod(0o600)
    # A nix that records its NIX_CONFIG and lingers, so the poll below sees it run.
    shim = tmp_path / "bin"
    shim.mkdir()
    seen = tmp_path / "seen"
    real = shutil.which("nix")
    (shim / "nix").write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$NIX_CONFIG" >> {seen}\nsleep 0.3\nexec {real} "$@"\n'
    )
    (shim / "nix").chmod(0o700)
    options = json.dumps({"access-tokens": {"command": f"cat {token_file}"}})
    processes: list[str] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            listing = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True)
            processes.extend(listing.stdout.splitlines())

    path = fleet.env["PATH"]
    fleet.env["PATH"] = f"{shim}:{path}"
    poller = threading.Thread(target=poll)
    poller.start()
    try:
        result = build(fleet, flake, "--limit", "web1", "--data", f"nix_options={options}", "-vvv")
    finally:
        done.set()
        poller.join()
        fleet.env["PATH"] = path

    assert result.returncode == 0, result.output
    assert any("eval --json" in line for line in processes), "the poll saw no evaluation"
    assert not any(token in line for line in processes)
    assert token not in result.output
    assert f"access-tokens = github.com={token}" in seen.read_text()


# example-real's machines on the test fleet: (machine, class, its attribute in the flake).
REAL = {
    "web1": "nixosConfigurations.web1.config.system.build.toplevel",
    "db1": "nixosConfigurations.db1.config.system.build.toplevel",
    "build1": "nixosConfigurations.build1.config.system.build.toplevel",
    "mac1": "darwinConfigurations.devmac.system",  # flake_attribute: devmac
    "home1": 'homeConfigurations."deploy@home1".activationPackage',
}


@pytest.fixture(scope="module")
def real_flake(tmp_path_factory) -> Path:
    return locked_real_flake(tmp_path_factory)


def real_fleet_file(fleet, tmp_path: Path) -> Path:
    """The test fleet's file, mac1 deployed from darwinConfigurations.devmac."""
    document = yaml.safe_load(fleet.fleet_file.read_text())
    for machine in document["machines"]:
        if machine["name"] == "mac1":
            machine.setdefault("data", {})["flake_attribute"] = "devmac"
    for key in ("key", "known_hosts", "config"):
        if key in document.get("ssh", {}):
            document["ssh"][key] = str((fleet.fleet_file.parent / document["ssh"][key]).resolve())
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def limits() -> list[str]:
    return [flag for machine in REAL for flag in ("--limit", machine)]


@needs_real_nix
def test_a_real_fleet_is_planned_without_building(fleet, real_flake, tmp_path):
    """Real NixOS (with home-manager as a module), nix-darwin and standalone home-manager
    machines: deploy/plan.py evaluates each and says what it would run, built from which
    derivation, and that building it needs the internet (so it builds nothing)."""
    systems = {}
    for machine, attribute in REAL.items():
        shown = subprocess.run(
            [*NIX, "eval", "--json", f"path:{real_flake}#{attribute}",
             "--apply", "s: { drv = s.drvPath; out = s.outPath; }"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        systems[machine] = json.loads(shown.stdout)
    running = fleet.deploy(ROOT / "example", *limits())  # the demo's systems, to plan from
    assert running.returncode == 0, running.output
    sessions = {machine: fleet.sessions(machine) for machine in fleet.machines}

    result = fleet.deploy(
        real_flake,
        *limits(),
        deploy_file="deploy/plan.py",
        fleet_file=real_fleet_file(fleet, tmp_path),
    )

    assert result.returncode == 0, result.output
    for machine, system in systems.items():
        plan = [line.strip() for line in result.report[machine]["plan"]]
        assert "would switch" in plan[0], plan
        assert f"system: {system['out']}" in plan, plan
        assert f"derivation: {system['drv']}" in plan, plan
        assert Path(system["drv"]).exists()
        assert not Path(system["out"]).exists(), "the plan built it"
        assert any("the build would first download" in line for line in plan), plan
    # One round trip each (its state), no lock taken.
    assert all(fleet.sessions(m) - sessions[m] == 1 for m in REAL), result.output


@needs_real_nix
def test_a_real_fleet_dry_build_evaluates_every_machine(fleet, real_flake, tmp_path):
    result = fleet.deploy(
        real_flake, *limits(), "--dry",
        deploy_file="deploy/build.py", fleet_file=real_fleet_file(fleet, tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.output
    assert "nothing was executed" in result.output
    lines = result.output.split("--> flakefleet: the systems evaluated\n", 1)[1].splitlines()
    for machine in REAL:
        report = result.report[machine]
        assert report["system"] and report["derivation"], report
        assert Path(report["derivation"]).exists() and not Path(report["system"]).exists()
        assert any(
            line.split()[:3] == [machine, "would", "change"] and report["system"] in line
            for line in lines
        ), result.output
    for machine in ("web1", "db1", "build1"):  # the dry run left no lock behind
        assert fleet.ssh(machine, "ls -d /run/flakefleet/lock 2>/dev/null || true") == ""


@needs_real_nix
def test_a_real_fleet_builds():
    pytest.skip(
        "nothing of the real 2020 nixpkgs builds offline: its first derivation needs the "
        "bootstrap tools from tarballs.nixos.org (the plan above says so)"
    )


def test_update_moves_the_inputs_shows_the_plan_and_commits_only_when_asked(fleet, tmp_path):
    """deploy/update.py: the lock file follows the input's new commit, the plan shows db1
    would switch, and the lock is committed only with update_commit."""
    library = tmp_path / "library"
    library.mkdir()
    (library / "version").write_text("1\n")
    git(library, "init", "-q", "-b", "main")
    git(library, "add", "-A")
    git(library, "commit", "-q", "-m", "1")
    flake = tmp_path / "fleet"
    shutil.copytree(ROOT / "example", flake)
    text = (flake / "flake.nix").read_text()
    hosts = "hosts = builtins.fromJSON (builtins.readFile ./hosts.json);"
    text = text.replace(
        "outputs = { self }:",
        f'inputs.library = {{ url = "git+file://{library}?ref=main"; flake = false; }};\n'
        "  outputs = { self, library }:",
    ).replace(
        hosts,
        "hosts = builtins.mapAttrs (name: host: host // { packages = [ library ]; })\n"
        "        (builtins.fromJSON (builtins.readFile ./hosts.json));",
    )
    (flake / "flake.nix").write_text(text)
    subprocess.run([*NIX, "flake", "lock", f"path:{flake}"], check=True, capture_output=True)
    git(flake, "init", "-q", "-b", "main")
    git(flake, "add", "-A")
    git(flake, "commit", "-q", "-m", "fleet")
    before = evaluate(flake, "db1")

    (library / "version").write_text("2\n")
    git(library, "commit", "-q", "-am", "2")
    result = fleet.deploy(flake, "--limit", "db1", deploy_file="deploy/update.py")

    assert result.returncode == 0, result.output
    assert f"flakefleet: updated {flake}/flake.lock" in result.output
    assert "Updated input 'library'" in result.output
    plan = result.report["db1"]["plan"]
    assert "would switch" in plan[0], plan
    changed = subprocess.run(["git", "-C", str(flake), "status", "--porcelain"],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert changed.split() == ["M", "flake.lock"]  # updated, not committed
    assert evaluate(flake, "db1") != before

    (library / "version").write_text("3\n")
    git(library, "commit", "-q", "-am", "3")
    committed = fleet.deploy(
        flake, "--limit", "db1", "--data", "update_commit=true", deploy_file="deploy/update.py"
    )
    assert committed.returncode == 0, committed.output
    log = subprocess.run(["git", "-C", str(flake), "log", "-1", "--format=%s", "--stat"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert log.startswith("flake.lock: update inputs") and "flake.lock" in log.splitlines()[-2]
    assert "committed:" in committed.output
