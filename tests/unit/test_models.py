"""Goals and machine states: what each goal considers done, and what each class supports."""

import pytest

from flakefleet.models import Goal, MachineClass, MachineState

OLD, NEW = "/nix/store/old-system", "/nix/store/new-system"


@pytest.mark.parametrize(
    ("goal", "current", "profile", "done"),
    [
        ("switch", NEW, NEW, True),
        ("switch", NEW, OLD, False),
        ("switch", OLD, NEW, False),
        ("boot", OLD, NEW, True),
        ("boot", NEW, OLD, False),
        ("test", NEW, OLD, True),
        ("test", OLD, NEW, False),
        ("dry-activate", NEW, NEW, False),
        ("build", OLD, NEW, True),
        ("build", OLD, OLD, False),
    ],
)
def test_a_goal_is_reached(goal, current, profile, done):
    machine = MachineState(current_system=current, profile_system=profile)
    assert Goal(goal).reached(machine, NEW) is done


def test_closure_is_present_when_running_or_selected():
    assert MachineState(current_system=NEW).has_closure(NEW)
    assert MachineState(profile_system=NEW).has_closure(NEW)
    assert not MachineState(current_system=OLD, profile_system=OLD).has_closure(NEW)


def test_goal_predicates():
    assert {goal for goal in Goal if goal.sets_profile} == {Goal.SWITCH, Goal.BOOT}
    assert {goal for goal in Goal if goal.runs_new_system} == {Goal.SWITCH, Goal.TEST}
    assert {goal for goal in Goal if not goal.activates} == {Goal.BUILD}


def test_each_class_supports_its_goals():
    assert all(goal.supported_by(MachineClass.NIXOS) for goal in Goal)
    assert Goal.BOOT.unsupported(MachineClass.DARWIN) == (
        "darwin machines cannot 'boot' (only switch, dry-activate, build)"
    )
    assert Goal.DRY_ACTIVATE.unsupported(MachineClass.HOME) == (
        "home machines cannot 'dry-activate' (only switch, build)"
    )
    assert Goal.SWITCH.unsupported(MachineClass.HOME) is None
