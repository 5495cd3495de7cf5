"""Safe activation on the test fleet: every goal, rollbacks (automatic, magic, health-gated),
reboots, a connection cut during activation, and the deploy lock.

The tests run in order on one fleet; each leaves its machines on a working generation.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest
from conftest import evaluate, set_host
from test_deploy import remote_state

BOOT_ID = "cat /proc/sys/kernel/random/boot_id"
LATEST_PHASE = "cat $(ls -td /run/flakefleet/activation/*/ | head -1)phase 2>/dev/null"
LATEST_LOG = "cat $(ls -td /run/flakefleet/activation/*/ | head -1)log"

pytestmark = pytest.mark.usefixtures("converged")  # every test starts from a converged fleet


def same_system(state: dict[str, str], before: dict[str, str]) -> bool:
    """Running, selected and kept generations are as before (activations are logged, though)."""
    keys = ("current", "profile", "generations")
    return all(state[key] == before[key] for key in keys)


def test_boot_selects_without_switching_then_a_reboot_runs_it(fleet, flake):
    before = remote_state(fleet, "web1")
    set_host(flake, "web1", version="boot")
    new = evaluate(flake, "web1")
    result = fleet.deploy(flake, "--limit", "web1", deploy_file="deploy/boot.py")
    assert result.returncode == 0, result.output
    state = remote_state(fleet, "web1")
    assert state["profile"] == new
    assert state["current"] == before["current"]
    assert int(state["generations"]) == int(before["generations"]) + 1

    boot_id = fleet.ssh("web1", BOOT_ID)
    result = fleet.deploy(
        flake, "--limit", "web1", "--data", "reboot=when-needed", deploy_file="deploy/boot.py"
    )
    assert result.returncode == 0, result.output
    assert "rebooted" in result.report["web1"]["changed"]
    assert fleet.ssh("web1", BOOT_ID) != boot_id
    assert remote_state(fleet, "web1")["current"] == new
    assert fleet.ssh("web1", "readlink -f /run/booted-system") == new


def test_a_reboot_command_that_does_not_reboot_is_not_taken_for_a_reboot(fleet, flake):
    """The boot id must change: a machine that answers on with its old boot id has not
    rebooted, however quickly it answers."""
    boot_id = fleet.ssh("web1", BOOT_ID)
    result = fleet.deploy(
        flake, "--limit", "web1", "--data", "reboot=always",
        "--data", "reboot_command=echo not rebooting", "--data", "reboot_timeout=10",
    )  # fmt: skip
    assert result.returncode != 0
    assert result.report["web1"]["error"] == "reboot: not back with a new boot id within 10s"
    assert "rebooted" not in result.report["web1"]["changed"]
    assert fleet.ssh("web1", BOOT_ID) == boot_id


def test_a_reboot_into_another_system_fails_the_machine(fleet, flake):
    """The imitation bootloader is pointed back at the old system just before the reboot (as
    a bootloader that failed to install would): the machine comes back, on the wrong system."""
    old = remote_state(fleet, "web1")["current"]
    set_host(flake, "web1", version="wrong-boot")
    new = evaluate(flake, "web1")
    boot_id = fleet.ssh("web1", BOOT_ID)
    result = fleet.deploy(
        flake, "--limit", "web1", "--data", "reboot=always",
        "--data",
        f"reboot_command=ln -sfn {old} /var/lib/fake-bootloader/default && systemctl reboot",
    )  # fmt: skip
    assert result.returncode != 0
    assert result.report["web1"]["error"] == f"reboot: came back on {old}, expected {new}"
    assert fleet.ssh("web1", BOOT_ID) != boot_id
    assert remote_state(fleet, "web1")["current"] == old
    # The next plain deploy puts the machine back on the new system.
    assert fleet.deploy(flake, "--limit", "web1").returncode == 0
    assert remote_state(fleet, "web1")["current"] == new


def test_test_switches_without_changing_the_boot_default(fleet, flake):
    before = remote_state(fleet, "web1")
    set_host(flake, "web1", version="test")
    result = fleet.deploy(flake, "--limit", "web1", deploy_file="deploy/test.py")
    assert result.returncode == 0, result.output
    state = remote_state(fleet, "web1")
    assert state["current"] == evaluate(flake, "web1")
    assert state["profile"] == before["profile"]
    assert state["generations"] == before["generations"]


def test_dry_activate_and_build_change_nothing_running(fleet, flake):
    """On web1 (systemd) and vpn1 (a namespace machine, whose activation runs services)."""
    machines = ("web1", "vpn1")
    before = {machine: remote_state(fleet, machine) for machine in machines}
    new = {}
    for machine in machines:
        set_host(flake, machine, version="dry")
        new[machine] = evaluate(flake, machine)
    limits = [option for machine in machines for option in ("--limit", machine)]
    for goal in ("dry-activate", "build"):
        result = fleet.deploy(flake, *limits, deploy_file=f"deploy/{goal}.py")
        assert result.returncode == 0, result.output
        for machine in machines:
            state, old = remote_state(fleet, machine), before[machine]
            assert (state["current"], state["profile"]) == (old["current"], old["profile"])
            assert state["activations"] == old["activations"]
        if goal == "dry-activate":
            # What it says would change is in the machine's activation log: the new system,
            # and vpn1's running service restarted into it (web1's unit stays the same).
            for machine in machines:
                said = fleet.ssh(machine, LATEST_LOG).splitlines()
                assert f"would activate {new[machine]}" in " ".join(said), said
            said = fleet.ssh("vpn1", LATEST_LOG).splitlines()
            assert any(line.endswith("would restart vpn") for line in said), said
    # build left the closure on the machine, ready for a switch.
    for machine in machines:
        path = new[machine]
        assert fleet.ssh(machine, f"nix-store --check-validity {path} && echo valid") == "valid"
    assert fleet.deploy(flake, *limits).returncode == 0
    assert remote_state(fleet, "web1")["current"] == new["web1"]


def test_rollback_to_the_previous_and_to_a_named_generation(fleet, flake):
    generations = fleet.ssh("web1", "nix-env -p /nix/var/nix/profiles/system --list-generations")
    numbers = [int(line.split()[0]) for line in generations.splitlines()]
    current = remote_state(fleet, "web1")["current"]
    result = fleet.deploy(flake, "--limit", "web1", deploy_file="deploy/rollback.py")
    assert result.returncode == 0, result.output
    previous = fleet.ssh("web1", f"readlink /nix/var/nix/profiles/system-{numbers[-2]}-link")
    assert remote_state(fleet, "web1")["current"] == previous
    back = fleet.deploy(
        flake, "--limit", "web1", "--data", f"generation={numbers[-1]}",
        deploy_file="deploy/rollback.py",
    )  # fmt: skip
    assert back.returncode == 0, back.output
    assert remote_state(fleet, "web1")["current"] == current


def test_config_that_breaks_sshd_rolls_itself_back(fleet, flake):
    before = remote_state(fleet, "web2")
    set_host(flake, "web2", version="nossh", breakSsh=True)
    result = fleet.deploy(flake, "--limit", "web2", "--data", "confirm_timeout=5")
    assert result.returncode != 0
    assert result.status("web2") == "failed"
    assert "rolled back to " + before["current"] in result.report["web2"]["error"]
    # Reachable again, on its previous generation, the broken one deleted.
    assert same_system(remote_state(fleet, "web2"), before)
    set_host(flake, "web2", version="1", breakSsh=None)


def test_confirmation_needs_a_new_login_not_the_open_connection(fleet, flake):
    """breakSsh makes sshd refuse new logins: sessions already open survive, new ones fail.
    With on_check_failure=keep the deployer still tries to confirm the new system after its
    smoke checks failed; only a new login may confirm it, so the machine rolls itself back."""
    before = remote_state(fleet, "web2")
    set_host(flake, "web2", version="nologin", breakSsh=True)
    result = fleet.deploy(
        flake, "--limit", "web2", "--data", "on_check_failure=keep",
        "--data", "confirm_timeout=20",  # long enough for a confirmation to arrive in time
    )  # fmt: skip
    set_host(flake, "web2", version="1", breakSsh=None)
    assert result.returncode != 0
    error = result.report["web2"]["error"]
    assert "could not confirm over a new SSH connection" in error, error
    assert "rolled back to " + before["current"] in error
    assert same_system(remote_state(fleet, "web2"), before)


def test_failing_health_check_rolls_back(fleet, flake):
    before = remote_state(fleet, "web1")
    set_host(flake, "web1", version="unhealthy")
    result = fleet.deploy(
        flake, "--limit", "web1", "--data", 'checks=[{"command": "test -e /nonexistent"}]'
    )
    assert result.returncode != 0
    error = result.report["web1"]["error"]
    assert "checks failed: command 'test -e /nonexistent' exited 1" in error
    assert "rolled back to " + before["current"] in error
    assert same_system(remote_state(fleet, "web1"), before)


def test_a_rollback_that_fails_is_reported_loudly(fleet, flake):
    set_host(flake, "web1", version="doomed", failActivation=True)
    fleet.ssh("web1", "touch /run/fail-every-activation")
    try:
        result = fleet.deploy(flake, "--limit", "web1")
    finally:
        fleet.ssh("web1", "rm /run/fail-every-activation")
    assert result.returncode != 0
    error = result.report["web1"]["error"]
    assert error.startswith(
        "activation: ROLLBACK FAILED: activation failed (exit 4); re-activating"
    )
    assert "the machine runs /nix/store/" in error and "fix it by hand" in error
    # By hand: activate what the profile selects again, now that activations work.
    fleet.ssh("web1", "/nix/var/nix/profiles/system/bin/switch-to-configuration switch")
    set_host(flake, "web1", version="unhealthy", failActivation=None)


def test_failing_health_check_with_keep_keeps_the_new_system(fleet, flake):
    result = fleet.deploy(
        flake, "--limit", "web1", "--data", 'checks=[{"command": "false"}]',
        "--data", "on_check_failure=keep",
    )  # fmt: skip
    assert result.returncode != 0
    assert "kept the new system" in result.report["web1"]["error"]
    assert remote_state(fleet, "web1")["current"] == evaluate(flake, "web1")


def test_failing_health_check_with_stop_stops_the_rollout(fleet, flake):
    web1, web2 = remote_state(fleet, "web1"), remote_state(fleet, "web2")
    set_host(flake, "web1", version="stop")
    set_host(flake, "web2", version="stop")
    result = fleet.deploy(
        flake, "--limit", "web", "--serial", "--data", "on_check_failure=stop",
        "--data", 'checks=[{"http": "http://127.0.0.1:1/", "timeout": 2}]',
    )  # fmt: skip
    assert result.returncode != 0
    # --serial takes the machines one by one, in no fixed order: the first one activates,
    # fails its check and is rolled back; the other one is never activated.
    errors = sorted(result.report[name]["error"] for name in ("web1", "web2"))
    assert errors[0].startswith("checks failed: GET http://127.0.0.1:1/")
    assert "rolled back to /nix/store/" in errors[0]
    assert errors[1].startswith("not activated: the rollout stopped (")
    assert remote_state(fleet, "web1")["current"] == web1["current"]
    assert remote_state(fleet, "web2")["current"] == web2["current"]


def test_activation_survives_a_cut_connection(fleet, flake):
    # Long enough to cut the connections mid-activation on a loaded machine.
    set_host(flake, "web1", version="cut", activationDelay=15)
    set_host(flake, "web2", version="1")
    new = evaluate(flake, "web1")
    deploy = fleet.start(flake, "--limit", "web1")
    assert fleet.wait_for("web1", f"{LATEST_PHASE} | grep -x running") == "running"
    # Kill every SSH session but sshd itself and the one doing the killing.
    fleet.ssh(
        "web1",
        'mine=$$; while [ $mine -gt 1 ]; do keep="$keep $mine"; '
        "mine=$(awk '{print $4}' /proc/$mine/stat); done; "
        # (sshd-session: OpenSSH 9.8 and later run each session in a program of its own.)
        "for pid in $(pgrep -x 'sshd|sshd-session'); do "
        "[ $pid = $(cat /run/sshd.pid) ] && continue; "
        'case " $keep " in *" $pid "*) ;; *) kill -9 $pid ;; esac; done',
    )
    result = fleet.finish(deploy)
    # The activation finished, the deployer reconnected, checked and confirmed it: the run
    # succeeds, and its summary says the connection was lost.
    assert result.returncode == 0, result.output
    assert remote_state(fleet, "web1")["current"] == new
    assert fleet.ssh("web1", LATEST_PHASE) == "succeeded"
    assert any("connection lost during activation" in n for n in result.report["web1"]["notes"])
    # No lock is left behind.
    assert fleet.ssh("web1", "ls /run/flakefleet").split() == ["activation", "serial"]
    set_host(flake, "web1", activationDelay=None)
    assert fleet.deploy(flake, "--limit", "web1").returncode == 0


def test_a_machine_another_deploy_took_after_the_preflight_is_left_alone(fleet, flake):
    """The lock is taken at the first change, not at the preflight: a deploy that another one
    overtook in between (its build is held back here) changes nothing and says so."""
    before = remote_state(fleet, "web1")
    place = Path(tempfile.mkdtemp(prefix="flakefleet-gate-"))  # in /tmp: a build user's too
    place.chmod(0o777)
    gate = place / "gate"
    set_host(flake, "web1", version="overtaken", buildGate=str(gate))
    late = fleet.start(flake, "--limit", "web1")
    deadline = time.monotonic() + 60
    while not gate.with_suffix(".waiting").exists():  # its preflight read the lock free
        assert time.monotonic() < deadline and late.poll() is None, "the build never started"
        time.sleep(0.1)
    other = "laptop:4242:1234:1"  # another deployer takes and releases the machine
    fleet.ssh("web1", f"mkdir /run/flakefleet/lock && echo {other} > /run/flakefleet/serial")
    fleet.ssh("web1", "rm -r /run/flakefleet/lock")
    gate.touch()
    result = fleet.finish(late)
    assert result.status("web1") == "failed", result.output
    assert result.report["web1"]["error"] == (
        "another deploy took the machine since this run read it: run again"
    )
    assert same_system(remote_state(fleet, "web1"), before)
    assert fleet.ssh("web1", "cat /run/flakefleet/serial") == other  # the lock was not taken
    assert fleet.ssh("web1", "ls /run/flakefleet/lock 2>/dev/null", check=False) == ""
    again = fleet.deploy(flake, "--limit", "web1")
    assert again.status("web1") == "changed", again.output
    assert remote_state(fleet, "web1")["current"] == evaluate(flake, "web1")
    set_host(flake, "web1", buildGate=None)
    shutil.rmtree(place)


def test_a_second_deploy_fails_fast_naming_the_holder(fleet, flake):
    set_host(flake, "web1", version="locked", activationDelay=15)  # the second deploy's window
    first = fleet.start(flake, "--limit", "web1")
    fleet.wait_for("web1", "cat /run/flakefleet/lock/holder 2>/dev/null")
    second = fleet.deploy(flake, "--limit", "web1")
    assert second.returncode != 0
    assert (
        f"locked by another deploy (deployer PID {first.pid} on " in second.report["web1"]["error"]
    )
    assert fleet.finish(first).returncode == 0
    assert remote_state(fleet, "web1")["current"] == evaluate(flake, "web1")


def test_lock_of_a_deployer_that_died_is_cleared_safely(fleet, flake):
    before = remote_state(fleet, "web1")
    # The refused deploy below must reach the machine while this activation still runs.
    set_host(flake, "web1", version="orphan", activationDelay=20)
    dead = fleet.start(flake, "--limit", "web1", "--data", "confirm_timeout=3")
    assert fleet.wait_for("web1", f"{LATEST_PHASE} | grep -x running") == "running"
    os.kill(dead.pid, signal.SIGKILL)
    fleet.finish(dead)
    # Its activation is still under way: wait for it rather than deploy over it.
    refused = fleet.deploy(flake, "--limit", "web1")
    assert "left an activation in progress" in refused.report["web1"]["error"]
    # Unconfirmed, the machine rolls itself back; then the lock can be taken over.
    fleet.wait_for("web1", f"{LATEST_PHASE} | grep -x rolled-back", timeout=90)
    assert remote_state(fleet, "web1")["current"] == before["current"]
    set_host(flake, "web1", activationDelay=None)
    result = fleet.deploy(flake, "--limit", "web1")
    assert result.returncode == 0, result.output
    assert any("took over the lock" in note for note in result.report["web1"]["notes"])
    assert remote_state(fleet, "web1")["current"] == evaluate(flake, "web1")


def test_a_lock_from_another_controller_is_broken_only_when_named(fleet, flake):
    holder = f"laptop:4242:1234:{int(time.time()) - 3600}"  # a deployer we cannot see die
    fleet.ssh(
        "web1", f"mkdir -p /run/flakefleet/lock && echo {holder} > /run/flakefleet/lock/holder"
    )
    refused = fleet.deploy(flake, "--limit", "web1")
    assert refused.returncode != 0
    error = refused.report["web1"]["error"]
    assert "locked by another deploy (deployer PID 4242 on laptop, for 36" in error
    assert "--data break_lock=laptop:4242" in error
    wrong = fleet.deploy(flake, "--limit", "web1", "--data", "break_lock=laptop:4243")
    assert wrong.status("web1") == "failed"
    # Refused for the lock, which another deployer's name does not break.
    assert wrong.report["web1"]["error"].startswith(
        "locked by another deploy (deployer PID 4242 on laptop, for 36"
    ), wrong.report["web1"]["error"]
    assert fleet.ssh("web1", "cat /run/flakefleet/lock/holder") == holder
    result = fleet.deploy(flake, "--limit", "web1", "--data", "break_lock=laptop:4242")
    assert result.returncode == 0, result.output
    assert any("broke (break_lock) the lock" in note for note in result.report["web1"]["notes"])
    assert fleet.ssh("web1", "ls /run/flakefleet/lock 2>/dev/null", check=False) == ""
