"""deploy/status.py on the test fleet: a pending reboot, a rollback made by hand, a machine
that cannot be reached, and what each row says of the deploy that put its system there."""

from __future__ import annotations

import pytest
from conftest import set_host
from test_deploy import remote_state

pytestmark = pytest.mark.usefixtures("converged")


def status(fleet, flake, *args: str):
    return fleet.deploy(flake, *args, deploy_file="deploy/status.py")


def test_a_converged_machine_is_up_to_date_with_its_deploy_record(fleet, flake):
    before = remote_state(fleet, "web2")
    # A unit that failed (web2 runs systemd; vpn1 has none to ask).
    fleet.ssh("web2", "systemd-run --unit=status-probe --quiet false; sleep 1")
    try:
        result = status(fleet, flake, "--limit", "web2", "--limit", "vpn1")
    finally:
        fleet.ssh("web2", "systemctl reset-failed status-probe.service")
    assert result.returncode == 0, result.output
    row = result.report["web2"]["state"]
    assert (row["verdict"], row["system"], row["reboot_pending"]) == (
        "up to date", before["current"], False,
    )  # fmt: skip
    assert row["failed_units"] == ["status-probe.service"]
    assert result.report["vpn1"]["state"]["failed_units"] is None
    assert "failed units: status-probe.service" in result.output
    assert row["deployed_by"] and "@" in row["deployed_by"]
    assert row["revision"] is None  # the test's flake is a copy outside git
    assert row["generation"] >= 1 and row["since"]
    assert row["roles"] == ["web"] and row["machine_class"] == "nixos"
    assert "--> flakefleet status" in result.output
    assert remote_state(fleet, "web2") == before  # the status changed nothing


def test_pending_reboot_hand_rollback_and_unreachable(fleet, flake):
    # web1: a `boot` deploy waits for its reboot.
    set_host(flake, "web1", version="next-boot")
    assert fleet.deploy(flake, "--limit", "web1", deploy_file="deploy/boot.py").returncode == 0
    # db1: a second deploy, then rolled back by hand as an operator would.
    deployed = remote_state(fleet, "db1")["current"]
    set_host(flake, "db1", version="two")
    assert fleet.deploy(flake, "--limit", "db1").returncode == 0
    fleet.ssh(
        "db1",
        "nix-env -p /nix/var/nix/profiles/system --rollback && "
        "/nix/var/nix/profiles/system/bin/switch-to-configuration switch",
    )
    # vpn1: down.
    fleet.testbed("stop", "vpn1")
    try:
        result = status(fleet, flake)
    finally:
        fleet.testbed("up")
        set_host(flake, "web1", version="1")
        set_host(flake, "db1", version="1")

    web1, db1 = result.report["web1"]["state"], result.report["db1"]["state"]
    assert web1["reboot_pending"] is True
    assert web1["verdict"] == "would switch"  # it runs the old system until it reboots
    assert db1["system"] == deployed
    assert db1["verdict"] == "would switch"
    assert any("rolled back" in phrase for phrase in db1["drift"]), db1
    assert db1["deployed_by"]  # the first deploy's record still names it
    assert result.status("vpn1") == "failed"
    assert result.report["vpn1"]["error"].startswith("unreachable")
    assert result.report["vpn1"]["state"] == {}
    # Every machine reached has its row, in the output too.
    shown = result.output.split("--> flakefleet status")[1]
    assert "reboot pending" in shown.split("web1", 1)[1].splitlines()[0]
    for machine in ("web1", "web2", "db1", "build1", "mac1", "home1"):
        assert result.report[machine]["state"]["machine"] == machine, machine
