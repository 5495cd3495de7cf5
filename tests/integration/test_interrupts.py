"""Interrupted, overlapping and half-failed deploys on the test fleet: Ctrl-C, a worker that
dies, a full /run, a deployer named in break_lock that still runs, and a home-manager state
directory someone else made.

The tests run in order on one fleet; each leaves its machines on a working generation.
"""

from __future__ import annotations

import os
import signal
import subprocess

from conftest import BIN, ROOT, evaluate, set_host
from test_deploy import remote_state

LATEST = "$(ls -td /run/flakefleet/activation/*/ | head -1)"
LATEST_PHASE = f"cat {LATEST}phase 2>/dev/null"
SWITCH_LOCK = "/run/nixos/switch-to-configuration.lock"


def test_ctrl_c_during_activation_rolls_back_reports_and_exits_non_zero(fleet, flake, converged):
    web1, db1 = remote_state(fleet, "web1"), remote_state(fleet, "db1")
    set_host(flake, "web1", version="interrupted", activationDelay=4)
    run = fleet.start(flake, "--limit", "web1", "--limit", "db1", "--data", "confirm_timeout=20")
    fleet.wait_for("web1", f"{LATEST_PHASE} | grep -x running")
    os.kill(run.pid, signal.SIGINT)
    result = fleet.finish(run)

    assert result.returncode != 0, result.output
    error = result.report["web1"]["error"]
    assert error.startswith("interrupted: the deploy was stopped during activation"), error
    assert f"rolled back to {web1['current']}" in error
    assert remote_state(fleet, "web1")["current"] == web1["current"]
    # db1 had nothing to activate, but its deploy had not finished either: it says what it runs.
    assert result.report["db1"]["error"] == (
        f"interrupted before the deploy finished; it runs {db1['current']}"
    )
    assert fleet.ssh("web1", "ls /run/flakefleet") == "activation"  # no lock left behind

    # The next deploy stays: nothing of the interrupted one comes back to undo it.
    set_host(flake, "web1", activationDelay=None)
    again = fleet.deploy(flake, "--limit", "web1", "--data", "confirm_timeout=3")
    assert again.status("web1") == "changed", again.output
    assert fleet.ssh("web1", f"sleep 5; {LATEST_PHASE}") == "succeeded"
    assert remote_state(fleet, "web1")["current"] == evaluate(flake, "web1")


def test_a_worker_that_died_frees_the_machine(fleet, flake, converged):
    set_host(flake, "web1", version="killed-worker", activationDelay=5)
    run = fleet.start(flake, "--limit", "web1")
    fleet.wait_for("web1", f"{LATEST_PHASE} | grep -x running")
    fleet.ssh("web1", f"kill -9 $(cat {LATEST}pid)")
    result = fleet.finish(run)
    error = result.report["web1"]["error"]
    assert "the activation worker died (killed, or out of memory)" in error, error
    assert "the machine runs /nix/store/" in error

    # The killed worker's own switch-to-configuration goes on (its child): let it finish, as
    # it holds the switch lock meanwhile.
    fleet.wait_for("web1", f"flock -n {SWITCH_LOCK} true && echo free", timeout=120)

    # Its deployer killed too: the lock is taken over instead of waiting for it forever.
    dead = fleet.ssh("web1", f"echo {LATEST}")
    set_host(flake, "web1", version="killed-both")
    run = fleet.start(flake, "--limit", "web1")
    fleet.wait_for("web1", f'[ "{LATEST}" != {dead} ] && {LATEST_PHASE} | grep -x running')
    os.kill(run.pid, signal.SIGKILL)
    fleet.finish(run)
    fleet.ssh("web1", f"kill -9 $(cat {LATEST}pid)")
    fleet.wait_for("web1", f"flock -n {SWITCH_LOCK} true && echo free", timeout=120)
    set_host(flake, "web1", activationDelay=None)
    result = fleet.deploy(flake, "--limit", "web1")
    assert result.returncode == 0, result.output
    notes = result.report["web1"]["notes"]
    assert any("an earlier activation's worker died" in note for note in notes), notes
    assert any("took over the lock" in note for note in notes), notes
    assert remote_state(fleet, "web1")["current"] == evaluate(flake, "web1")


def test_a_full_run_takes_no_lock_and_leaves_none(fleet, flake, converged):
    before = remote_state(fleet, "web1")
    fleet.ssh(
        "web1",
        "mount -t tmpfs -o size=16k,mode=755 tmpfs /run/flakefleet && "
        "dd if=/dev/zero of=/run/flakefleet/fill bs=4k 2>/dev/null; true",
    )
    try:
        set_host(flake, "web1", version="full-run")
        result = fleet.deploy(flake, "--limit", "web1")
        assert result.status("web1") == "failed", result.output
        assert result.report["web1"]["error"] == (
            "no deploy lock: could not write /run/flakefleet/lock/holder (is it full?)"
        )
        assert fleet.ssh("web1", "ls -d /run/flakefleet/lock 2>/dev/null", check=False) == ""
        assert remote_state(fleet, "web1")["current"] == before["current"]
    finally:
        fleet.ssh("web1", "umount /run/flakefleet")
    assert fleet.deploy(flake, "--limit", "web1").status("web1") == "changed"


def test_break_lock_never_breaks_a_deployer_that_still_runs_here(fleet, flake, converged):
    set_host(flake, "web1", version="live-holder", activationDelay=4)
    first = fleet.start(flake, "--limit", "web1")
    holder = fleet.wait_for("web1", "cat /run/flakefleet/lock/holder 2>/dev/null")
    name = ":".join(holder.split(":")[:2])
    second = fleet.deploy(flake, "--limit", "web1", "--data", f"break_lock={name}")
    assert second.status("web1") == "failed"
    assert "which is still running on this controller" in second.report["web1"]["error"]
    assert fleet.finish(first).status("web1") == "changed"
    set_host(flake, "web1", activationDelay=None)


def test_a_home_state_directory_someone_else_made_is_refused(fleet, flake, converged):
    before = remote_state(fleet, "home1")
    planted = "/tmp/flakefleet-deploy"
    fleet.ssh("home1", f"rm -rf {planted}; mkdir -m 777 {planted}; chown nobody {planted}")
    set_host(flake, "home1", version="planted")
    result = fleet.deploy(flake, "--limit", "home1")
    assert result.status("home1") == "failed", result.output
    assert result.report["home1"]["error"] == (
        f"no deploy lock: {planted} must belong to deploy and be writable by nobody else"
    )
    assert remote_state(fleet, "home1")["current"] == before["current"]
    fleet.ssh("home1", f"rm -rf {planted}")
    assert fleet.deploy(flake, "--limit", "home1").status("home1") == "changed"


def test_a_power_cut_before_confirmation_boots_what_ran_before(fleet, flake, converged):
    before = remote_state(fleet, "web1")
    set_host(flake, "web1", version="power-cut")
    slow_check = '[{"command": "sleep 30", "timeout": 60}]'  # holds the confirmation back
    run = fleet.start(
        flake, "--limit", "web1", "--data", f"checks={slow_check}", "--data", "confirm_timeout=90"
    )
    fleet.wait_for("web1", f"{LATEST_PHASE} | grep -x awaiting-confirmation")
    assert remote_state(fleet, "web1")["current"] == evaluate(flake, "web1")  # it runs the new
    fleet.testbed("stop", "web1")  # the power goes
    fleet.testbed("up")  # and comes back: the machine boots its boot default
    result = fleet.finish(run)
    assert result.status("web1") == "failed", result.output
    after = remote_state(fleet, "web1")
    assert (after["current"], after["profile"]) == (before["current"], before["profile"])
    assert after["generations"] == before["generations"]
    plan = fleet.deploy(flake, "--limit", "web1", deploy_file="deploy/plan.py")
    section = plan.output.split("--> flakefleet plan\n", 1)[1]
    assert "would switch" in section.splitlines()[0], section


def note(text: str) -> tuple[str, str]:
    """A source /var/src/note holding `text` (a pipe source: a local command's output)."""
    return "--data", f'sources={{"note": {{"type": "pipe", "command": "echo {text}"}}}}'


def test_a_rollback_puts_the_sources_back_too(fleet, flake, converged):
    assert fleet.deploy(flake, "--limit", "web1", *note("v1")).returncode == 0
    before = remote_state(fleet, "web1")
    set_host(flake, "web1", version="bad-with-new-sources", failActivation=True)
    try:
        result = fleet.deploy(flake, "--limit", "web1", *note("v2"))
    finally:
        set_host(flake, "web1", failActivation=None)
    error = result.report["web1"]["error"]
    assert error.endswith(f"rolled back to {before['current']} and its sources"), error
    # The old system runs on the sources it was deployed with, not the new ones.
    assert fleet.ssh("web1", "cat /var/src/note") == "v1"
    assert remote_state(fleet, "web1")["sources"] == before["sources"]


def test_a_deploy_run_from_another_directory_finds_the_repositorys_flake(
    fleet, flake, converged, tmp_path
):
    """group_data/all.py's `flake = "example"` is the repository's example/, wherever pyinfra
    runs from (here: no --data flake, and the working directory is elsewhere)."""
    completed = subprocess.run(
        [str(BIN / "pyinfra"), "-y", str(ROOT / "inventory.py"), str(ROOT / "deploy/plan.py"),
         "--limit", "db1"],
        cwd=tmp_path, env=fleet.env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    assert "--> flakefleet plan" in output and "db1" in output.split("--> flakefleet plan")[1]


def test_without_confirmation_a_broken_system_is_said_to_stay(fleet, flake, converged):
    """Last: web1 is left unreachable (its sshd refuses logins) for the rest of this module."""
    set_host(flake, "web1", version="nossh-unconfirmed", breakSsh=True)
    result = fleet.deploy(flake, "--limit", "web1", "--data", "confirm_timeout=0")
    assert result.status("web1") == "failed", result.output
    error = result.report["web1"]["error"]
    assert error.startswith("checks failed: ")
    assert error.endswith("not rolled back: with confirm_timeout = 0 the new system stays"), error
    assert "its deploy lock is still held (unreachable)" in " ".join(result.report["web1"]["notes"])
