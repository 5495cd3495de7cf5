"""Deploys to machines with a real systemd as PID 1 (test-fleet machines booted with
systemd-nspawn: web1, web2 and db1 in the default fleet, and build1 here too), whose units see
only systemd's own PATH, as on NixOS (nixpkgs#261691), and whose imitation NixOS systems manage
real units as NixOS's switch-to-configuration does: a role service is a unit
(`fleet-web.service`), started, restarted and stopped by the switch.

The machines run Nix 2.26 (Debian trixie's), the controller and vpn1 Debian bookworm's 2.8.
"""

from __future__ import annotations

import importlib.util

import pytest
from conftest import ROOT, evaluate, running_fleet, set_host
from test_activation import LATEST_LOG
from test_closure import build, new_version, system_of, valid_for
from test_deploy import remote_state

LATEST_UNIT = "flakefleet-activation-$(basename $(ls -td /run/flakefleet/activation/*/ | head -1))"
WEB = "fleet-web.service"
FETCH = (
    "python3 -c 'import urllib.request; print(urllib.request.urlopen(\"{url}\").read().decode())'"
)


@pytest.fixture(scope="module")
def fleet():
    with running_fleet("--systemd", "build1") as testbed:
        yield testbed


def unit(fleet, machine: str, name: str = WEB) -> dict[str, str]:
    """A unit's state on a machine, as systemd tells it."""
    keys = ("ActiveState", "MainPID", "FragmentPath", "ExecMainStartTimestampMonotonic")
    lines = fleet.ssh(machine, f"systemctl show -p {','.join(keys)} {name}").splitlines()
    return dict(line.split("=", 1) for line in lines)


def test_the_fleet_mixes_nix_versions(fleet):
    for machine in ("web1", "web2", "db1", "build1"):
        assert fleet.ssh(machine, "nix --version").startswith("nix (Nix) 2.26."), machine
        assert fleet.ssh(machine, "cat /proc/1/comm") == "systemd"
    assert fleet.ssh("vpn1", "nix --version").startswith("nix (Nix) 2.8.")


def test_a_switch_runs_as_a_unit_of_its_own_with_the_sessions_path(fleet, flake):
    """The controller (Nix 2.8) copies to machines on 2.26 and back (sources, closures)."""
    result = fleet.deploy(flake)
    assert result.returncode == 0, result.output
    for machine in fleet.machines:
        assert remote_state(fleet, machine)["current"] == evaluate(flake, machine), machine
    # The worker ran as a transient unit (out of the SSH session, as nixos-rebuild's does).
    journal = fleet.ssh("build1", f"journalctl -q --no-pager -u {LATEST_UNIT}.service")
    assert "flakefleet-activation-" in journal, journal


def test_role_services_are_units_the_switch_started(fleet, flake):
    state = unit(fleet, "web1")
    assert state["ActiveState"] == "active"
    assert state["FragmentPath"] == f"/etc/systemd/system/{WEB}"
    assert fleet.ssh("web1", f"readlink /etc/systemd/system/{WEB}") == (
        f"/etc/static/systemd/system/{WEB}"
    )
    # The unit's process is the service, in the unit's cgroup (not the activation's).
    cgroup = fleet.ssh("web1", f"cat /proc/{state['MainPID']}/cgroup")
    assert f"/system.slice/{WEB}" in cgroup
    assert "<title>web1</title>" in fleet.ssh("web1", FETCH.format(url="http://web1:18081/"))
    assert unit(fleet, "db1", "fleet-db.service")["ActiveState"] == "active"


def test_switch_to_configuration_runs_as_nixos_rebuild_runs_it(fleet, flake):
    """nixos-rebuild-ng runs it in a transient unit (systemd-run --wait --pipe), whose PATH is
    only systemd's: the imitation's switch and activate set their own, as NixOS's do."""
    command = (
        "systemd-run --collect --no-ask-password --pipe --quiet --service-type=exec --wait"
        " --unit=nixos-rebuild-switch-to-configuration"
        " /run/current-system/bin/switch-to-configuration test"
    )
    fleet.ssh("web1", command)  # fails (with its output) unless it exits 0
    assert unit(fleet, "web1")["ActiveState"] == "active"


def test_units_start_stop_or_stay_as_the_generation_says(fleet, flake):
    before = unit(fleet, "web1")
    set_host(flake, "web1", version="2")
    result = fleet.deploy(flake, "--limit", "web1")
    assert result.status("web1") == "changed", result.output
    # The web unit is the same file (its script does not depend on the version): not restarted.
    assert unit(fleet, "web1") == before
    assert fleet.ssh("web1", "cat /etc/fleet-release") == "web1 2"
    # A unit the new generation adds is started ...
    set_host(flake, "web1", roles=["web", "vpn"])
    result = fleet.deploy(flake, "--limit", "web1")
    assert result.status("web1") == "changed", result.output
    assert unit(fleet, "web1", "fleet-vpn.service")["ActiveState"] == "active"
    # ... and one it drops is stopped, and its link goes.
    set_host(flake, "web1", roles=["web"])
    result = fleet.deploy(flake, "--limit", "web1")
    assert result.status("web1") == "changed", result.output
    assert unit(fleet, "web1", "fleet-vpn.service")["ActiveState"] == "inactive"
    assert fleet.ssh("web1", "ls /etc/systemd/system/ | grep -c fleet-vpn || true") == "0"
    assert unit(fleet, "web1") == before


def test_dry_activate_says_what_would_change_and_changes_nothing(fleet, flake):
    before, state = unit(fleet, "web1"), remote_state(fleet, "web1")
    set_host(flake, "web1", version="dry", failService=True)
    try:
        result = fleet.deploy(flake, "--limit", "web1", deploy_file="deploy/dry-activate.py")
    finally:
        set_host(flake, "web1", failService=None)
    assert result.returncode == 0, result.output
    said = fleet.ssh("web1", LATEST_LOG)  # the activation's own log on the machine
    assert f"would stop the following units: {WEB}" in said, said
    assert f"would start the following units: {WEB}" in said, said
    assert unit(fleet, "web1") == before
    after = remote_state(fleet, "web1")
    assert (after["current"], after["profile"]) == (state["current"], state["profile"])


def test_the_plan_tells_what_a_switch_would_do_to_services(fleet, flake):
    """web1 gains the vpn role. Before its new system is on web1 the plan says it cannot tell;
    once deploy/build.py put it there, dry-activate tells: fleet-vpn.service would start. The
    plan changes nothing (systems, units, no lock)."""
    set_host(flake, "web1", roles=["web", "vpn"])
    try:
        first = fleet.deploy(flake, "--limit", "web1", deploy_file="deploy/plan.py")
        assert first.returncode == 0, first.output
        absent = "services: not known (the new system is not on the machine yet: "
        assert any(line.strip().startswith(absent) for line in first.report["web1"]["plan"])
        built = fleet.deploy(flake, "--limit", "web1", deploy_file="deploy/build.py")
        assert built.returncode == 0, built.output
        before, units = remote_state(fleet, "web1"), unit(fleet, "web1")
        second = fleet.deploy(flake, "--limit", "web1", deploy_file="deploy/plan.py")
        assert second.returncode == 0, second.output
        said = [line.strip() for line in second.report["web1"]["plan"]]
        told = [line for line in said if line.startswith("services: ")]
        assert told == ["services: would start fleet-vpn.service"], said
        assert remote_state(fleet, "web1") == before
        assert unit(fleet, "web1") == units
        assert unit(fleet, "web1", "fleet-vpn.service")["ActiveState"] == "inactive"
        assert fleet.ssh("web1", "ls -d /run/flakefleet/lock 2>/dev/null || true") == ""
    finally:
        set_host(flake, "web1", roles=["web"])


def test_a_unit_that_fails_shows_in_the_checks_and_rolls_back(fleet, flake):
    """The service crashes a second after the switch started it: switch-to-configuration's own
    check is over by then; the smoke check `systemctl --failed` sees it, and the deploy rolls
    back, which starts the old service again."""
    before = remote_state(fleet, "web1")
    set_host(flake, "web1", version="crashes", failService=True)
    try:
        result = fleet.deploy(flake, "--limit", "web1")
    finally:
        set_host(flake, "web1", version="2", failService=None)
    assert result.status("web1") == "failed"
    error = result.report["web1"]["error"]
    assert "checks failed: " in error and "test_no_unit_failed" in error, error
    assert "rolled back to " + before["current"] in error, error
    after = remote_state(fleet, "web1")
    assert (after["current"], after["profile"]) == (before["current"], before["profile"])
    assert unit(fleet, "web1")["ActiveState"] == "active"
    assert fleet.ssh("web1", "systemctl list-units --state=failed --no-legend --plain") == ""


def _settled_failed_units() -> str:
    """The smoke suites' failed-units check (tests/smoke/test_units.py), as a check sends it."""
    spec = importlib.util.spec_from_file_location("units", ROOT / "tests/smoke/test_units.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SETTLED_FAILED_UNITS


def test_the_failed_units_check_does_not_wait_for_its_own_login(fleet):
    """pam_systemd starts user@UID.service (and user-runtime-dir@UID.service) at a user's first
    login: the check's own login must not count as a service that just started."""
    check = _settled_failed_units()
    assert fleet.ssh("web1", check) == ""  # whatever a test before started has settled
    # Stopping root's user manager ends this login too (ssh says "closed by remote host").
    fleet.ssh("web1", "systemctl stop user@0.service user-runtime-dir@0.service", check=False)
    # `sleep` stands in for the wait, which says whether the check would have waited.
    waits = f"sleep() {{ echo waited $1; }}\n{check}\nsystemctl is-active user@0.service"
    assert fleet.ssh("web1", waits) == "active"  # the login started it; the check did not wait


def test_test_goal_starts_units_without_the_boot_default(fleet, flake):
    default = fleet.ssh("web1", "readlink /var/lib/fake-bootloader/default")
    set_host(flake, "web1", roles=["web", "vpn"])
    try:
        result = fleet.deploy(flake, "--limit", "web1", deploy_file="deploy/test.py")
        assert result.status("web1") == "changed", result.output
        assert unit(fleet, "web1", "fleet-vpn.service")["ActiveState"] == "active"
        assert fleet.ssh("web1", "readlink /var/lib/fake-bootloader/default") == default
    finally:
        set_host(flake, "web1", roles=["web"])


def test_boot_goal_changes_no_unit_until_the_reboot(fleet, flake):
    set_host(flake, "web2", roles=["web", "vpn"])
    result = fleet.deploy(flake, "--limit", "web2", deploy_file="deploy/boot.py")
    assert result.status("web2") == "changed", result.output
    assert unit(fleet, "web2", "fleet-vpn.service")["ActiveState"] == "inactive"
    fleet.testbed("reboot", "web2")
    assert fleet.ssh("web2", "readlink -f /run/current-system") == evaluate(flake, "web2")
    fleet.wait_for(
        "web2",
        "systemctl is-active fleet-vpn.service fleet-web.service | grep -vx active || echo up",
    )
    assert unit(fleet, "web2", "fleet-vpn.service")["ActiveState"] == "active"
    assert unit(fleet, "web2")["ActiveState"] == "active"


def test_the_worker_survives_an_sshd_restart_by_the_new_system(fleet, flake):
    """A new sshd configuration restarts ssh.service in the switch (NixOS's sshd unit is
    restarted in one go, X-StopIfChanged=false); the worker, a unit of its own, lives on."""
    before = unit(fleet, "web1", "ssh.service")
    set_host(flake, "web1", sshdRevision="2")
    result = fleet.deploy(flake, "--limit", "web1")
    assert result.status("web1") == "changed", result.output
    after = unit(fleet, "web1", "ssh.service")
    assert after["ActiveState"] == "active"
    assert after["MainPID"] != before["MainPID"], "sshd was not restarted"
    assert "restarting the following units: ssh.service" in fleet.ssh("web1", LATEST_LOG)


def test_a_failed_activation_rolls_back_there_too(fleet, flake):
    before = remote_state(fleet, "build1")
    set_host(flake, "build1", version="broken", failActivation=True)
    try:
        result = fleet.deploy(flake, "--limit", "build1")
    finally:
        set_host(flake, "build1", failActivation=None)
    assert result.status("build1") == "failed"
    assert "rolled back to " + before["current"] in result.report["build1"]["error"]
    after = remote_state(fleet, "build1")
    assert (after["current"], after["profile"]) == (before["current"], before["profile"])


def test_a_builder_on_nix_2_26_builds_for_a_machine_on_2_8(fleet, flake):
    new_version(flake, "vpn1")
    system = system_of(flake, "vpn1")
    result = build(fleet, flake, "--limit", "vpn1", "--data", "build_on=build1")
    assert result.returncode == 0, result.output
    assert any("build1 sent" in c for c in result.report["vpn1"]["changed"])
    assert valid_for(fleet, "vpn1", "root", system)
    assert valid_for(fleet, "build1", "root", system)
