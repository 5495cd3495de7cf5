"""Faults on the test fleet: bad input, a machine down, an activation that fails, a failing
smoke check. In each, the other machines converge, the summary names the machine and why,
and the exit status is non-zero."""

from __future__ import annotations

import os
import subprocess

import pytest
import yaml
from conftest import BIN, ROOT, evaluate, set_host
from test_deploy import remote_state

pytestmark = pytest.mark.usefixtures("converged")  # every test starts from a converged fleet


def test_bad_fleet_file_stops_before_any_machine_is_contacted(fleet, tmp_path):
    bad = tmp_path / "fleet.yaml"
    bad.write_text(fleet.fleet_file.read_text().replace("    port:", "    prot:", 1))
    before = {machine: fleet.sessions(machine) for machine in fleet.machines}
    completed = subprocess.run(
        [str(BIN / "pyinfra"), "-y", "inventory.py", "deploy/site.py"],
        cwd=ROOT, env={**os.environ, "FLAKEFLEET_FLEET": str(bad)},
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert completed.returncode != 0
    errors = [line for line in completed.stderr.splitlines() if line.startswith("flakefleet:")]
    assert errors == [
        f"flakefleet: {bad}: machine 'web1': unknown field 'prot' "
        "(expected one of: name, address, port, user, class, roles, data)"
    ]
    assert "Connecting" not in completed.stdout + completed.stderr
    assert {machine: fleet.sessions(machine) for machine in fleet.machines} == before


def test_bad_settings_stop_the_run_before_any_machine_runs_a_command(fleet, flake):
    """A bad value (from the fleet file) and a misspelt name (from --data): one line each,
    naming machines, setting and layer; no machine runs a command, nothing deployed changes."""
    document = yaml.safe_load(fleet.fleet_file.read_text())
    for entry in document["machines"]:
        if entry["name"] == "db1":
            entry.setdefault("data", {})["keep_generations"] = 0
    bad = fleet.state / "fleet-bad-settings.yaml"  # beside the keys it names
    bad.write_text(yaml.safe_dump(document))
    set_host(flake, "web1", version="never-deployed")
    states = {machine: remote_state(fleet, machine) for machine in ("web1", "db1")}
    before = {machine: fleet.sessions(machine) for machine in fleet.machines}
    result = fleet.deploy(flake, "--data", "on_check_faliure=keep", fleet_file=bad)
    assert result.returncode != 0, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("flakefleet:")]
    assert errors == [
        f"flakefleet: {', '.join(sorted(fleet.machines))}: setting 'on_check_faliure' (--data): "
        "unknown; did you mean 'on_check_failure'?",
        f"flakefleet: db1: setting 'keep_generations' ({bad}, machine 'db1'): must be a whole "
        "number of at least 1 (or None), not 0",
    ], result.output
    assert {machine: fleet.sessions(machine) for machine in fleet.machines} == before
    assert {machine: remote_state(fleet, machine) for machine in ("web1", "db1")} == states
    assert "flakefleet: nothing was executed" in result.output


def test_the_flake_check_gate_stops_the_run_before_any_machine(fleet, flake):
    """`flake_check = true`: `nix flake check --no-build` first; a check that fails to
    evaluate stops the run with one line naming the flake, before any machine runs a command."""
    text = (flake / "flake.nix").read_text()
    marker = "      homeConfigurations = builtins.listToAttrs (map"
    assert marker in text
    broken = '      checks.x86_64-linux.broken = throw "the fleet check found a problem";\n'
    (flake / "flake.nix").write_text(text.replace(marker, broken + marker))
    set_host(flake, "web1", version="never-deployed")
    states = {machine: remote_state(fleet, machine) for machine in ("web1", "db1")}
    before = {machine: fleet.sessions(machine) for machine in fleet.machines}
    try:
        result = fleet.deploy(flake, "--data", "flake_check=true")
        unchecked = fleet.deploy(flake, "--limit", "db1", deploy_file="deploy/plan.py")
    finally:
        (flake / "flake.nix").write_text(text)
        set_host(flake, "web1", version="1")
    assert result.returncode != 0, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("flakefleet:")]
    assert len(errors) == 1 and errors[0].startswith(f"flakefleet: flake check of {flake}: "), (
        result.output
    )
    assert "the fleet check found a problem" in errors[0]
    assert {machine: fleet.sessions(machine) for machine in fleet.machines if machine != "db1"} == {
        machine: count for machine, count in before.items() if machine != "db1"
    }
    assert {machine: remote_state(fleet, machine) for machine in ("web1", "db1")} == states
    assert unchecked.returncode == 0, unchecked.output  # off by default: no check, no stop
    checked = fleet.deploy(flake, "--limit", "db1", "--data", "flake_check=true",
                           deploy_file="deploy/plan.py")  # fmt: skip
    assert checked.returncode == 0, checked.output  # the example flake passes its check


def test_a_goal_its_class_lacks_fails_the_machine_before_contacting_it(fleet, flake):
    """nix-darwin and home-manager machines only switch: `deploy/boot.py` fails them at once,
    untouched, while the NixOS machine of the same run gets its new boot default."""
    set_host(flake, "web1", version="boot-goal")
    others = ("mac1", "home1")
    before = {machine: fleet.sessions(machine) for machine in others}
    limits = [argument for name in ("web1", *others) for argument in ("--limit", name)]
    result = fleet.deploy(flake, *limits, deploy_file="deploy/boot.py")
    assert result.returncode != 0
    assert result.report["mac1"]["error"] == (
        "darwin machines cannot 'boot' (only switch, dry-activate, build)"
    )
    assert result.report["home1"]["error"] == "home machines cannot 'boot' (only switch, build)"
    assert {machine: fleet.sessions(machine) for machine in others} == before
    assert result.status("web1") == "changed", result.output
    assert remote_state(fleet, "web1")["profile"] == evaluate(flake, "web1")


def test_a_run_that_dies_while_preparing_leaves_no_lock(fleet, flake, tmp_path):
    locked = tmp_path / "locked"
    dies = tmp_path / "dies.py"  # the pipeline's first step, then a bug in the deploy code
    dies.write_text(
        "from pyinfra import host\nfrom operations import preflight\n"
        f"if preflight.preflight():\n    open({str(locked)!r}, 'a').write(host.name + '\\n')\n"
        "raise RuntimeError('a bug')\n"
    )
    result = fleet.deploy(flake, deploy_file=str(dies))
    assert result.returncode != 0 and "a bug" in result.output
    machines = locked.read_text().split()
    assert machines  # the preflight took their lock
    for machine in machines:
        assert fleet.ssh(machine, "ls -d /run/flakefleet/lock /tmp/flakefleet-*/lock", False) == ""
    again = fleet.deploy(flake)
    assert again.returncode == 0 and "took over" not in again.output


def test_unreachable_machine_fails_alone(fleet, flake):
    set_host(flake, "web1", version="3")
    set_host(flake, "db1", version="3")
    fleet.testbed("stop", "db1")
    try:
        result = fleet.deploy(flake)
    finally:
        fleet.testbed("up")
    assert result.returncode != 0
    assert result.status("db1") == "failed"
    assert result.report["db1"]["error"].startswith("unreachable")
    assert "db1" in result.output.split("flakefleet summary")[-1]
    assert result.status("web1") == "changed"
    assert remote_state(fleet, "web1")["current"] == evaluate(flake, "web1")
    # Back up, the machine converges on the next run.
    again = fleet.deploy(flake)
    assert again.returncode == 0, again.output
    assert remote_state(fleet, "db1")["current"] == evaluate(flake, "db1")


def test_failed_activation_rolls_back(fleet, flake):
    before = remote_state(fleet, "web1")
    set_host(flake, "web1", version="4", failActivation=True)
    result = fleet.deploy(flake)
    assert result.returncode != 0
    assert result.status("web1") == "failed"
    assert "rolled back to " + before["current"] in result.report["web1"]["error"]
    after = remote_state(fleet, "web1")
    assert after["current"] == before["current"]
    assert after["profile"] == before["profile"]
    assert after["generations"] == before["generations"]  # the failed generation is gone
    assert fleet.ssh("web1", "cat /etc/fleet-release") == "web1 3"
    for machine in fleet.machines:
        if machine != "web1":
            assert result.status(machine) in ("unchanged", "changed")
            assert result.report[machine]["error"] is None
    set_host(flake, "web1", failActivation=None)
    assert fleet.deploy(flake).returncode == 0


def test_failing_smoke_check_fails_the_machine(fleet, flake):
    # A process of its own on a namespace machine, a unit's main process on a systemd machine.
    fleet.ssh(
        "web2",
        "kill $(cat /run/services/web.pid 2>/dev/null || systemctl show -P MainPID fleet-web)",
    )
    try:
        result = fleet.deploy(flake)
    finally:
        fleet.ssh("web2", "/run/current-system/bin/switch-to-configuration test")
    assert result.returncode != 0
    assert result.status("web2") == "failed"
    assert "checks failed: test_service_answers" in result.report["web2"]["error"]
    assert result.status("web1") == "unchanged"
    assert fleet.deploy(flake).returncode == 0


def test_a_copy_that_fills_the_disk_fails_cleanly(fleet, flake):
    """build1's /nix is a 64 MiB disk: an 80 MB closure cannot fit."""
    before = remote_state(fleet, "build1")
    set_host(flake, "build1", version="big", blobSize=80_000_000)
    result = fleet.deploy(flake, "--limit", "build1")
    assert result.returncode != 0
    error = result.report["build1"]["error"]
    assert error.startswith("copy: ") and "No space left on device" in error
    assert "garbage collected" in error
    # The machine still runs and can re-activate its system; nothing half-copied is left.
    assert remote_state(fleet, "build1")["current"] == before["current"]
    fleet.ssh("build1", "/run/current-system/bin/switch-to-configuration test")
    invalid = fleet.ssh("build1", "ls /nix/store | grep -c blob-80000000 || true")
    assert invalid == "0"
    # The next deploy that fits goes through.
    set_host(flake, "build1", version="small", blobSize=None)
    again = fleet.deploy(flake, "--limit", "build1")
    assert again.returncode == 0, again.output
    assert remote_state(fleet, "build1")["current"] == evaluate(flake, "build1")
