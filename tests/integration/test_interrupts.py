"""Interrupted, overlapping and half-failed deploys on the test fleet: Ctrl-C, a worker that
dies, a full /run, a deployer named in break_lock that still runs, and a home-manager state
directory someone else made.

The tests run in order on one fleet; each leaves its machines on a working generation.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid

from conftest import BIN, ROOT, evaluate, set_host
from test_deploy import remote_state

from flakefleet.records import RUNS, parse_history

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
    assert fleet.ssh("web1", "ls /run/flakefleet").split() == ["activation", "serial"]  # no lock
    # The machine's history has the interrupted activation; the controller's, the run.
    last = parse_history(fleet.ssh("web1", "cat /var/lib/flakefleet/history.jsonl"))[-1]
    assert (last.outcome, last.system, last.generation) == (
        "rolled-back", evaluate(flake, "web1"), None,
    )  # fmt: skip
    assert last.message.startswith("the deploy was stopped during activation")
    records = [json.loads(line) for path in sorted((ROOT / RUNS).glob("*.jsonl"))
               for line in path.read_text().splitlines()]  # fmt: skip
    run = [r for r in records if r["machine"] == "web1" and r["system"] == last.system]
    assert run and run[-1]["status"] == "failed" and run[-1]["error"] == error

    # The next deploy stays: nothing of the interrupted one comes back to undo it.
    set_host(flake, "web1", activationDelay=None)
    again = fleet.deploy(flake, "--limit", "web1", "--data", "confirm_timeout=10")
    assert again.status("web1") == "changed", again.output
    assert fleet.ssh("web1", f"sleep 11; {LATEST_PHASE}") == "succeeded"
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


def test_a_rollback_to_an_older_generation_brings_back_its_sources(fleet, flake, converged):
    """Three deploys later, generation N's sources are still kept (their generation is), and
    `deploy/rollback.py --data generation=N` runs N on them; every activation is in the
    machine's history and every run in the controller's records."""
    numbers = []
    for version in ("g1", "g2", "g3"):
        set_host(flake, "db1", version=version)
        result = fleet.deploy(flake, "--limit", "db1", *note(version))
        assert result.returncode == 0, result.output
        numbers.append(int(fleet.ssh("db1", "readlink /nix/var/nix/profiles/system")
                           .split("-")[1]))  # fmt: skip
    set_host(flake, "db1", version="1")
    first = fleet.ssh("db1", f"readlink /nix/var/nix/profiles/system-{numbers[0]}-link")

    result = fleet.deploy(
        flake, "--limit", "db1", "--data", f"generation={numbers[0]}",
        deploy_file="deploy/rollback.py",
    )  # fmt: skip

    assert result.returncode == 0, result.output
    assert fleet.ssh("db1", "cat /var/src/note") == "g1"
    assert remote_state(fleet, "db1")["current"] == first
    history = parse_history(fleet.ssh("db1", "cat /var/lib/flakefleet/history.jsonl"))
    assert [(e.generation, e.outcome) for e in history[-4:]] == [
        (numbers[0], "succeeded"), (numbers[1], "succeeded"), (numbers[2], "succeeded"),
        (numbers[0], "succeeded"),
    ]  # fmt: skip
    assert history[-1].message.endswith("with the sources it was deployed with")
    assert history[-1].sources == history[-4].sources
    assert fleet.ssh("db1", "stat -c %a /var/lib/flakefleet/history.jsonl") == "600"
    # The controller's records: one line per machine and run, the last one this rollback's.
    records = [json.loads(line) for path in sorted((ROOT / RUNS).glob("*.jsonl"))
               for line in path.read_text().splitlines()]  # fmt: skip
    mine = [r for r in records if r["machine"] == "db1" and r["system"] in (first,)]
    assert mine and mine[-1]["status"] == "changed" and mine[-1]["ssh_logins"] >= 1


def test_another_machine_behind_a_known_host_key_is_not_touched(fleet, flake, converged):
    """vpn1 answers with the host key this controller deployed it with, but another machine
    id (a clone of its image, say): nothing is touched until the user accepts the new id."""
    original = fleet.ssh("vpn1", "cat /etc/machine-id")
    before = remote_state(fleet, "vpn1")
    other = uuid.uuid4().hex
    fleet.ssh("vpn1", f"echo {other} > /etc/machine-id")
    try:
        set_host(flake, "vpn1", version="cloned")
        result = fleet.deploy(flake, "--limit", "vpn1")
        assert result.returncode != 0
        error = result.report["vpn1"]["error"]
        assert error.startswith(f"another machine answers for vpn1: machine id {other}, but "
                                f"vpn1 had {original} with the same host key"), error  # fmt: skip
        assert error.endswith(f"run again with --data accept_machine_id={other}"), error
        assert remote_state(fleet, "vpn1") == before  # not even the lock was taken
        assert fleet.ssh("vpn1", "ls /run/flakefleet/lock 2>&1; true").endswith(
            "No such file or directory"
        )
        accepted = fleet.deploy(flake, "--limit", "vpn1", "--data", f"accept_machine_id={other}")
        assert accepted.returncode == 0, accepted.output
        again = fleet.deploy(flake, "--limit", "vpn1")  # the new id is the one remembered
        assert again.returncode == 0, again.output
    finally:
        set_host(flake, "vpn1", version="1")
        fleet.ssh("vpn1", f"echo {original} > /etc/machine-id")
    # Back to the first id: a mismatch again, until accepted.
    assert fleet.deploy(flake, "--limit", "vpn1").returncode != 0
    back = fleet.deploy(flake, "--limit", "vpn1", "--data", f"accept_machine_id={original}")
    assert back.returncode == 0, back.output


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
