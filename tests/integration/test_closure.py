"""Building and copying on the test fleet: every `build_on` mode, every machine class copied
as its own user, signatures, the cache fan-out, GC roots and pruning, with real Nix, sshd
and pyinfra. Deploys stop at `goal=build` (closure copied, profile ready): activation is
tested in test_activation.py.

The tests run in order on one fleet.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import uuid
from pathlib import Path

import pytest
from conftest import ROOT, evaluate, profile_of

from flakefleet.builds import gcroot


def system_of(flake: Path, name: str, env: dict[str, str] | None = None) -> str:
    """The machine's system path, evaluated independently of flakefleet."""
    return evaluate(flake, name, env)


def new_version(flake: Path, *machines: str) -> str:
    """Give machines a version never built before (so nothing is in any store yet)."""
    version = uuid.uuid4().hex[:8]
    hosts = json.loads((flake / "hosts.json").read_text())
    for machine in machines:
        hosts[machine]["version"] = version
    (flake / "hosts.json").write_text(json.dumps(hosts, indent=2))
    return version


def as_user(fleet, machine: str, user: str, command: str, check: bool = True) -> str:
    return fleet.ssh(f"{user}@{machine}", command, check)


def valid_for(fleet, machine: str, user: str, path: str) -> bool:
    """Whether the path is valid in the machine's store, asked as that user."""
    return (
        as_user(fleet, machine, user, f"nix-store --check-validity {path} && echo ok", False)
        == "ok"
    )


def build(fleet, flake: Path, *args: str):
    return fleet.deploy(flake, "--data", "goal=build", *args)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def logins(fleet, machine: str, user: str) -> int:
    """How many SSH logins as `user` the machine's sshd has accepted so far."""
    log = fleet.state / "machines" / machine / "console.log"
    return log.read_text().count(f"Accepted publickey for {user} from")


def test_every_class_is_built_here_and_copied_as_its_user(fleet, flake):
    users = {"mac1": "deploy", "home1": "deploy"}
    before = {
        (machine, user): logins(fleet, machine, user)
        for machine in fleet.machines
        for user in ("root", "deploy")
    }
    result = build(fleet, flake)
    assert result.returncode == 0, result.output
    for machine in fleet.machines:
        # Every login of the deploy, the copy's included, was as the machine's own user.
        user = users.get(machine, "root")
        other = "root" if user == "deploy" else "deploy"
        assert logins(fleet, machine, user) > before[machine, user], machine
        assert logins(fleet, machine, other) == before[machine, other], machine
    for machine in fleet.machines:
        system = system_of(flake, machine)
        assert result.report[machine]["system"] == system
        assert valid_for(fleet, machine, users.get(machine, "root"), system), machine
        # The controller keeps every closure it deployed alive in its own store.
        root = gcroot(ROOT, fleet.fleet_file, machine)  # this fleet's, beside other fleets'
        assert root.resolve() == Path(system)
        roots = subprocess.run(
            ["nix-store", "--query", "--roots", system], capture_output=True, text=True, check=True
        ).stdout
        assert str(root) in roots
    # Laid out like nix-darwin's and home-manager's outputs.
    mac = system_of(flake, "mac1")
    assert fleet.ssh("mac1", f"cat {mac}/darwin-version") == "mac1-1"
    assert fleet.ssh("mac1", f"test -x {mac}/activate && test -d {mac}/sw/bin && echo ok") == "ok"
    home = system_of(flake, "home1")
    assert (
        fleet.ssh(
            "home1", f"test -x {home}/activate && cat {home}/home-files/.config/fleet/version"
        )
        == "1"
    )


def test_example_activations_behave_like_the_real_ones(fleet, flake):
    """What the lead's activation will run: darwin's `activate` as root, home-manager's as
    the user (straight over ssh here)."""
    mac = system_of(flake, "mac1")
    fleet.ssh("mac1", f"HOME=/var/root {mac}/activate")  # as root
    assert fleet.ssh("mac1", "readlink /run/current-system") == mac
    assert fleet.ssh("mac1", "cat /etc/fleet-release") == "mac1 1"
    assert "must run as root" in as_user(fleet, "mac1", "deploy", f"{mac}/activate 2>&1 || true")

    home = system_of(flake, "home1")
    as_user(fleet, "home1", "deploy", f"{home}/activate")
    profile = profile_of(fleet, "home1")[0]  # where home-manager's tool finds it
    assert as_user(fleet, "home1", "deploy", f"readlink -f {profile}") == home
    assert (
        as_user(
            fleet, "home1", "deploy", "readlink -f ~/.local/state/home-manager/gcroots/current-home"
        )
        == home
    )
    assert as_user(fleet, "home1", "deploy", "cat ~/.config/fleet/version") == "1"
    # Activating again adds no generation (home-manager only sets a profile that moved).
    as_user(fleet, "home1", "deploy", f"{home}/activate")
    assert (
        as_user(fleet, "home1", "deploy", f"nix-env -p {profile} --list-generations | wc -l") == "1"
    )


def test_build_on_target_builds_nothing_here(fleet, flake):
    new_version(flake, "web1", "home1")
    systems = {m: system_of(flake, m) for m in ("web1", "home1")}
    result = build(fleet, flake, "--limit", "web1", "--limit", "home1", "--data", "build_on=target")
    assert result.returncode == 0, result.output
    for machine, system in systems.items():
        assert "built on the machine" in result.report[machine]["changed"]
        assert valid_for(fleet, machine, "root", system)
        assert not Path(system).exists(), "the controller built it"


def test_build_on_a_fleet_builder_sends_the_closure_directly(fleet, flake):
    new_version(flake, "web2", "db1")
    systems = {m: system_of(flake, m) for m in ("web2", "db1")}
    before = fleet.sessions("build1")
    result = build(fleet, flake, "--limit", "web2", "--limit", "db1", "--data", "build_on=build1")
    assert result.returncode == 0, result.output
    # One build for both machines (derivations in, build), then per machine: sign, send.
    assert fleet.sessions("build1") - before == 2 + 2 * len(systems)
    for machine, system in systems.items():
        assert any("build1 sent" in c for c in result.report[machine]["changed"])
        assert valid_for(fleet, machine, "root", system)
        assert valid_for(fleet, "build1", "root", system)
        assert not Path(system).exists(), "the controller built it"


def test_a_flake_in_git_builds_on_the_machine_as_evaluated_here(fleet, tmp_path):
    # A configuration that embeds `self` (linked into the system), in a git work tree with
    # a file git does not track: the machine builds what the controller evaluated, and the
    # untracked file reaches neither store nor /var/src/config.
    flake = tmp_path / "example"
    shutil.copytree(ROOT / "example", flake)
    text = (flake / "flake.nix").read_text()
    plain = "make (hosts.${name} // { inherit name; "
    assert plain in text
    embeds = "make (hosts.${name} // { inherit name; packages = [ self ]; "
    (flake / "flake.nix").write_text(text.replace(plain, embeds))
    new_version(flake, "vpn1")
    git = ["git", "-C", str(flake), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "fleet"], check=True)
    secret = uuid.uuid4().hex
    (flake / "notes.secret").write_text(secret)
    system = system_of(flake, "vpn1")

    result = build(fleet, flake, "--limit", "vpn1", "--data", "build_on=target")

    assert result.returncode == 0, result.output
    assert "built on the machine" in result.report["vpn1"]["changed"]
    assert valid_for(fleet, "vpn1", "root", system)
    assert fleet.ssh("vpn1", "ls /var/src/config/flake.nix") == "/var/src/config/flake.nix"
    assert fleet.ssh("vpn1", "ls /var/src/config/notes.secret", check=False) == ""
    # The untracked file would sit at the top of the flake's source in a store.
    copies = "cat /nix/store/*-source/notes.secret /var/src/*/notes.secret 2>/dev/null; true"
    assert secret not in fleet.ssh("vpn1", copies)
    assert not any(
        secret in path.read_text() for path in Path("/nix/store").glob("*-source/notes.secret")
    )


def test_signed_copies_over_ssh_ng_need_a_trusted_key(fleet, flake, tmp_path):
    new_version(flake, "db1")
    result = build(fleet, flake, "--limit", "db1", "--data", "copy_protocol=ssh-ng")
    assert result.returncode == 0, result.output
    assert valid_for(fleet, "db1", "root", system_of(flake, "db1"))

    # A key the machine does not trust: refused, and the error says why.
    new_version(flake, "db1")
    untrusted = tmp_path / "untrusted.sec"
    result = build(
        fleet, flake, "--limit", "db1", "--data", "copy_protocol=ssh-ng",
        "--data", f"signing_key={untrusted}",
    )  # fmt: skip
    assert result.returncode != 0
    assert "does not trust the closure's signatures" in result.report["db1"]["error"]
    assert untrusted.exists() and (tmp_path / "untrusted.sec.pub").exists()

    # Unsigned by explicit choice: ssh-ng then skips the check (root is a trusted user).
    result = build(
        fleet,
        flake,
        "--limit",
        "db1",
        "--data",
        "copy_protocol=ssh-ng",
        "--data",
        "sign_closures=false",
    )
    assert result.returncode == 0, result.output
    assert valid_for(fleet, "db1", "root", system_of(flake, "db1"))


def test_cache_fan_out_uploads_each_path_once(fleet, flake, tmp_path):
    machines = ["web1", "web2", "db1", "vpn1", "home1"]
    new_version(flake, *machines)
    systems = {m: system_of(flake, m) for m in machines}
    port = free_port()
    cache = {"store": f"file://{tmp_path}/cache", "url": f"http://127.0.0.1:{port}", "serve": True}
    limits = [arg for m in machines for arg in ("--limit", m)]
    result = build(fleet, flake, *limits, "--data", f"cache={json.dumps(cache)}")
    assert result.returncode == 0, result.output

    closure = subprocess.run(
        ["nix-store", "--query", "--requisites", *systems.values()],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    uploads = [
        note for m in machines for note in result.report[m]["notes"] if "to the cache" in note
    ]
    assert uploads == [f"uploaded {len(set(closure))} paths to the cache"]
    assert len(list((tmp_path / "cache").glob("*.narinfo"))) == len(set(closure))
    for machine, system in systems.items():
        assert any("from the cache" in c for c in result.report[machine]["changed"])
        assert not any(c.startswith("copied") for c in result.report[machine]["changed"])
        assert valid_for(fleet, machine, "root", system)
    with pytest.raises(OSError):  # the server is gone
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


PROFILE = "/nix/var/nix/profiles/system"
GENERATIONS = f"nix-env -p {PROFILE} --list-generations"


def generation_numbers(fleet, machine: str) -> list[int]:
    return [int(line.split()[0]) for line in fleet.ssh(machine, GENERATIONS).splitlines()]


@pytest.mark.parametrize("machine", ["build1", "mac1"])  # root, and a sudoer's system profile
def test_pruning_keeps_the_newest_n(fleet, flake, machine):
    system = system_of(flake, machine)
    other = fleet.ssh(machine, f"readlink -f {system}/sw")
    # Five generations, alternating between two paths; the newest is the system.
    paths = " ".join([system, other] * 2 + [system])
    fleet.ssh(machine, f"for p in {paths}; do nix-env -p {PROFILE} --set $p; done")
    numbers = generation_numbers(fleet, machine)
    assert len(numbers) >= 5

    result = build(fleet, flake, "--limit", machine, "--data", "keep_generations=2")
    assert result.returncode == 0, result.output
    assert generation_numbers(fleet, machine) == numbers[-2:]
    assert "pruned" in " ".join(result.report[machine]["changed"])
    assert any("store paths deleted" in note for note in result.report[machine]["notes"])


def test_pruning_keeps_the_current_generation_too(fleet, flake):
    numbers = generation_numbers(fleet, "build1")
    # Rolled back to the older of the two: keeping 1 keeps the newest and the current one.
    fleet.ssh("build1", f"nix-env -p {PROFILE} --switch-generation {numbers[-2]}")
    result = build(fleet, flake, "--limit", "build1", "--data", "keep_generations=1")
    assert result.returncode == 0, result.output
    lines = fleet.ssh("build1", GENERATIONS).splitlines()
    assert [int(line.split()[0]) for line in lines] == numbers[-2:]
    assert "(current)" in lines[0]
    fleet.ssh("build1", f"nix-env -p {PROFILE} --switch-generation {numbers[-1]}")


def test_no_op_redeploy_costs_the_command_the_readme_promises(fleet, flake, tmp_path):
    """A machine already on its system costs 1 SSH command, the preflight (README, Benchmarks;
    `build` runs no smoke checks; no lock is taken, so none is released): signing, caches,
    roots and pruning cost nothing."""
    # build1's profile selects its system (previous test): build, copy and prune are no-ops.
    baseline = fleet.sessions("build1")
    result = build(fleet, flake, "--limit", "build1")
    assert result.returncode == 0, result.output
    assert result.status("build1") == "unchanged"
    assert fleet.sessions("build1") - baseline == 1
    cache = {"store": f"file://{tmp_path}/cache", "url": "http://127.0.0.1:9", "serve": True}
    baseline = fleet.sessions("build1")
    result = build(
        fleet, flake, "--limit", "build1", "--data", "keep_generations=5",
        "--data", f"cache={json.dumps(cache)}", "--data", "copy_protocol=ssh-ng",
    )  # fmt: skip
    assert result.returncode == 0, result.output
    assert result.status("build1") == "unchanged"
    assert fleet.sessions("build1") - baseline == 1
