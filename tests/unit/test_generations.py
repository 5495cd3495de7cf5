"""How many generations a machine will have after a deploy (what pruning decides on)."""

import pytest

from flakefleet.models import Generation, Goal, MachineState
from operations.generations import generations_after

NEW, OLD = "/nix/store/new-system", "/nix/store/old-system"


def generations(count: int) -> list[Generation]:
    return [Generation(n, "2026-11-22 03:00:00", n == count) for n in range(1, count + 1)]


@pytest.mark.parametrize(
    ("goal", "profile", "expected"),
    [("switch", OLD, 4), ("switch", NEW, 3), ("boot", OLD, 4), ("test", OLD, 3), ("build", OLD, 3)],
)
def test_generations_after_a_deploy(goal, profile, expected):
    machine = MachineState(profile_system=profile, generations=generations(3))
    assert generations_after(machine, NEW, Goal(goal)) == expected
