"""Rollouts in waves on the test fleet: a canary that fails stops the rollout before the
second wave; a wave's failures up to `max_failures` let it go on, one more stops it. Machines
of waves that did not start are untouched: system, generations and sources as they were."""

from __future__ import annotations

import json
import re

import pytest
from conftest import set_host
from test_deploy import remote_state

pytestmark = pytest.mark.usefixtures("converged")

# The roster's order: web1, web2, db1 | vpn1, build1, mac1 | home1 in waves of 3.
ROLLOUT = {"batch": 3, "max_failures": 1}


def rollout(settings: dict) -> tuple[str, str]:
    return "--data", f"rollout={json.dumps(settings)}"


def every_machine(fleet, flake, version: str) -> None:
    for machine in fleet.machines:
        set_host(flake, machine, version=version)


def failing(flake, *machines: str, on: bool = True) -> None:
    for machine in machines:
        set_host(flake, machine, failActivation=True if on else None)


def test_a_failing_canary_stops_the_rollout_before_the_second_wave(fleet, flake):
    every_machine(fleet, flake, "canary")
    failing(flake, "db1")
    before = {machine: remote_state(fleet, machine) for machine in fleet.machines}
    try:
        result = fleet.deploy(flake, *rollout({"canary": "db", "batch": 2}))
    finally:
        failing(flake, "db1", on=False)
    assert result.returncode != 0
    assert result.status("db1") == "failed"
    assert "rolled back" in result.report["db1"]["error"]
    reason = "rollout stopped after wave 1: 1 of 1 failed (db1)"
    for machine in fleet.machines:
        if machine == "db1":
            continue
        assert result.status(machine) == "skipped", (machine, result.report[machine])
        assert result.report[machine]["error"] == reason
        assert remote_state(fleet, machine) == before[machine], machine  # sources too
    assert re.search(rf"web1 +skipped +{re.escape(reason)}", result.output), result.output


def test_failures_up_to_the_threshold_go_on_one_more_stops(fleet, flake):
    every_machine(fleet, flake, "one-fails")
    failing(flake, "web2")
    try:
        result = fleet.deploy(flake, *rollout(ROLLOUT))
    finally:
        failing(flake, "web2", on=False)
    assert result.status("web2") == "failed"
    assert {result.status(m) for m in fleet.machines if m != "web2"} == {"changed"}, result.output

    every_machine(fleet, flake, "two-fail")
    failing(flake, "web1", "db1")
    before = {machine: remote_state(fleet, machine) for machine in ("vpn1", "mac1", "home1")}
    try:
        result = fleet.deploy(flake, *rollout(ROLLOUT))
    finally:
        failing(flake, "web1", "db1", on=False)
    assert (result.status("web1"), result.status("db1"), result.status("web2")) == (
        "failed", "failed", "changed",
    )  # fmt: skip
    for machine in ("vpn1", "build1", "mac1", "home1"):
        assert result.status(machine) == "skipped", (machine, result.report[machine])
        assert (
            "rollout stopped after wave 1: 2 of 3 failed (web1, db1)"
            in (result.report[machine]["error"])
        )
    for machine, state in before.items():
        assert remote_state(fleet, machine) == state, machine


def test_a_bad_rollout_is_one_line_before_any_machine(fleet, flake):
    result = fleet.deploy(
        flake, "--limit", "web1", "--limit", "db1", *rollout({"batch": 1, "colour": "red"})
    )
    assert result.returncode != 0
    assert "setting 'rollout' (--data): unknown field 'colour'" in result.output
    assert "flakefleet: nothing was executed" in result.output
