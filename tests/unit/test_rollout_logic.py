"""Waves of a rollout (flakefleet.rollout): canary, batches, thresholds, bad settings."""

from __future__ import annotations

import pytest

from flakefleet.rollout import Rollout, allowed_failures, parse, problem, waves

FLEET = ["web1", "web2", "web3", "db1", "vpn1", "mac1", "home1"]
GROUPS = {"web": {"web1", "web2", "web3"}, "db": {"db1"}, "nixos": {"web1", "web2", "web3",
          "db1", "vpn1"}}  # fmt: skip


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        (None, [FLEET]),
        ({"batch": 3}, [FLEET[0:3], FLEET[3:6], FLEET[6:]]),
        ({"canary": "db", "batch": 2},
         [["db1"], ["web1", "web2"], ["web3", "vpn1"], ["mac1", "home1"]]),
        ({"canary": "web*"}, [["web1", "web2", "web3"], ["db1", "vpn1", "mac1", "home1"]]),
        ({"canary": 1, "batch": "50%"}, [["web1"], FLEET[1:5], FLEET[5:]]),  # ceil(3.5) = 4
        ({"canary": "nosuch"}, [FLEET]),  # a glob that matches nothing: no canary wave
    ],
)  # fmt: skip
def test_waves_keep_the_fleet_order_after_the_canary(setting, expected):
    assert waves(parse(setting), FLEET, GROUPS) == expected


def test_a_wave_may_lose_up_to_max_failures():
    assert allowed_failures(Rollout(), 3) == 0
    assert allowed_failures(Rollout(max_failures=1), 3) == 1
    assert allowed_failures(Rollout(max_failures="50%"), 3) == 1  # floor
    assert allowed_failures(Rollout(max_failures="100%"), 3) == 3


@pytest.mark.parametrize(
    ("setting", "said"),
    [
        ("3", "must be a mapping with canary, batch and max_failures"),
        ({"size": 3}, "unknown field 'size' (expected one of: canary, batch, max_failures)"),
        ({"batch": 0}, "batch must be a whole number of at least 1, or a percentage like '25%'"),
        ({"batch": "110%"}, "batch must be a whole number of at least 1, or a percentage"),
        ({"max_failures": -1}, "max_failures must be a whole number of at least 0"),
        ({"canary": ""}, "canary must be a role, a class, a glob of machine names, or a count"),
        ({"canary": True}, "canary must be a role, a class, a glob of machine names, or a count"),
    ],
)
def test_a_bad_rollout_says_what_is_wrong(setting, said):
    found = problem(setting)
    assert found is not None and found.startswith(said), found


def test_a_good_rollout_has_no_problem():
    assert problem({"canary": "web", "batch": "25%", "max_failures": "10%"}) is None
    assert problem(None) is None
