"""Old generations: a machine keeps the newest `keep_generations` of its profile (and the one it
runs, whatever its age), and the store paths only older ones used are collected.

The decision is made from the preflight's generations, so a machine with nothing to prune
costs no command.
"""

from __future__ import annotations

import re
from typing import Any

from pyinfra import host, state
from pyinfra.api import FunctionCommand, operation

from flakefleet import nix, remote_nix
from flakefleet.models import Goal, MachineState
from flakefleet.run import Run
from operations.preflight import changes_machine


def generations_after(machine: MachineState, system: str, goal: Goal) -> int:
    """How many generations the profile will have once this deploy is done."""
    adds = goal.sets_profile and machine.profile_system != system
    return len(machine.generations) + (1 if adds else 0)


@operation()
@changes_machine
def prune(
    system: nix.System, machine: MachineState, goal: Goal = Goal.SWITCH, keep: int | None = None
):
    """Delete the machine's generations beyond the newest `keep` and collect garbage.

    + keep: how many generations to keep (None: keep them all)

    Example:

    .. code:: python

        generations.prune(name="Prune", system=target, machine=machine, keep=5)
    """
    if keep is None:
        host.noop("keep_generations is not set: every generation stays")
        return
    count = generations_after(machine, system.out, goal)
    if count <= keep:
        host.noop(f"{host.name} has {count} generations, keeps {keep}")
        return
    target = Run.of(state).target(host.name)
    yield FunctionCommand(_prune, (remote_nix.prune_command(target, keep),), {})


def _prune(state: Any, host: Any, command: str) -> bool:
    run = Run.of(state)
    outcome = run.outcome(host.name)
    # The system profile belongs to root; a home-manager profile to its user.
    succeeded, output = run.target(host.name).run_over(host, command)
    if not succeeded:
        lines = [line for line in output.stderr_lines if line.strip()]
        outcome.fail(f"prune: {lines[-1] if lines else 'failed'}")
        return False
    removed = len(re.findall(r"removing (?:profile )?(?:version|generation) \d+", output.stderr))
    freed = re.search(r"(\d+ store paths deleted, .* freed)", output.stdout + output.stderr)
    outcome.changed_by(f"pruned {removed} generations")
    if freed:
        outcome.note(freed.group(1))
    return True
