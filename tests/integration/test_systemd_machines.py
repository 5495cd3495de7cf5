"""The activation worker on a machine with a real systemd as PID 1 (a test-fleet machine booted
with systemd-nspawn, `testbed up --systemd`), whose units see only systemd's own PATH, as on
NixOS (nixpkgs#261691): a worker that relied on the caller's PATH dies there at once.

build1 is that machine here: its example system has no services (the Debian root has no
python3 for the example's web servers).
"""

from __future__ import annotations

import pytest
from conftest import evaluate, running_fleet, set_host
from test_deploy import remote_state

LATEST_UNIT = "flakefleet-activation-$(basename $(ls -td /run/flakefleet/activation/*/ | head -1))"


@pytest.fixture(scope="module")
def fleet():
    with running_fleet("--systemd", "build1") as testbed:
        yield testbed


def test_a_switch_runs_as_a_unit_of_its_own_with_the_sessions_path(fleet, flake):
    result = fleet.deploy(flake, "--limit", "build1")
    assert result.status("build1") == "changed", result.output
    assert remote_state(fleet, "build1")["current"] == evaluate(flake, "build1")
    # The worker ran as a transient unit (out of the SSH session, as nixos-rebuild's does).
    journal = fleet.ssh("build1", f"journalctl -q --no-pager -u {LATEST_UNIT}.service")
    assert "flakefleet-activation-" in journal, journal


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
