"""Activation: make a system what the machine runs or boots, and roll back when that fails.

The remote half is ``scripts/activate.sh``, sent on the command's standard input: it sets the
profile, runs ``switch-to-configuration``, and on failure restores the previous generation.
"""

from __future__ import annotations

from importlib.resources import files

from pyinfra import host
from pyinfra.api import StringCommand, operation

from facts.machine import MachineState
from facts.nix import SYSTEM_PROFILE
from flakefleet import nix, report

GOALS = ("switch", "boot", "test", "dry-activate", "build")

ACTIVATE_SCRIPT = files("operations").joinpath("scripts/activate.sh").read_text()


def has_system(goal: str, machine: MachineState, system: str) -> bool:
    """Whether the machine already is where `goal` would put it."""
    running = machine.current_system == system
    selected = machine.profile_system == system
    return {
        "switch": running and selected,
        "boot": selected,
        "test": running,
        "dry-activate": False,  # changes nothing, so it always runs
        "build": running or selected,
    }[goal]


@operation()
def activate(system: nix.System, machine: MachineState, goal: str = "switch"):
    """Make the system what the machine runs (switch, test), boots (boot), or show what would
    change (dry-activate). A failed activation rolls the machine back and fails it.

    Example:

    .. code:: python

        system.activate(name="Activate", system=target, machine=machine, goal="boot")
    """
    if goal not in GOALS:
        yield report.stop(f"activate: unknown goal {goal!r} (one of {', '.join(GOALS)})")
        return
    report.outcome(host.name).goal = goal
    if goal == "build" or has_system(goal, machine, system.out):
        host.noop(f"{host.name} is already on {system.out} for {goal}")
        return
    yield StringCommand("sh", "-s", "--", goal, system.out, SYSTEM_PROFILE, _stdin=ACTIVATE_SCRIPT)
    if goal != "dry-activate":
        yield report.change(goal)
