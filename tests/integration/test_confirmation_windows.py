"""Each machine's confirmation window starts when its own checks can begin: a machine that
activates in a second is not rolled back for waiting on one that takes longer than
`confirm_timeout` (#17: activations that take 1 s and 60 s with confirm_timeout = 30).

web2 activates at once, web1 takes longer than the confirmation timeout.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Fleet, evaluate, fleet_of, set_host
from test_deploy import remote_state

CONFIRM = 20  # seconds: time enough for the smoke checks on a busy machine
MACHINES = ("web1", "web2")


@pytest.fixture(scope="module")
def fleet(flake: Path) -> Iterator[Fleet]:
    with fleet_of(flake, *MACHINES) as testbed:
        yield testbed


def test_a_fast_machine_is_not_rolled_back_for_waiting_on_a_slow_one(fleet, flake):
    assert fleet.deploy(flake).returncode == 0
    set_host(flake, "web1", version="slow", activationDelay=CONFIRM + 15)
    set_host(flake, "web2", version="fast")
    result = fleet.deploy(flake, "--data", f"confirm_timeout={CONFIRM}")
    assert result.returncode == 0, result.output
    for machine in MACHINES:
        assert result.status(machine) == "changed", result.output
        state = remote_state(fleet, machine)
        assert state["current"] == state["profile"] == evaluate(flake, machine)


def test_a_machine_whose_new_system_cuts_it_off_still_rolls_back_on_time(fleet, flake):
    """While it waits for the slow one, nothing can confirm a machine no new login reaches:
    it rolls itself back within its window, and the slow one is switched."""
    before = remote_state(fleet, "web2")
    set_host(flake, "web1", version="slow-2", activationDelay=CONFIRM + 15)
    set_host(flake, "web2", version="cut-off", breakSsh=True)
    try:
        result = fleet.deploy(flake, "--data", f"confirm_timeout={CONFIRM}")
    finally:
        set_host(flake, "web1", activationDelay=None)
        set_host(flake, "web2", breakSsh=None)
    assert result.status("web1") == "changed", result.output
    assert result.status("web2") == "failed"
    error = result.report["web2"]["error"]
    assert "rolled back to " + before["current"] in error, error
    after = remote_state(fleet, "web2")
    assert (after["current"], after["profile"]) == (before["current"], before["profile"])
