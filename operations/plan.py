"""The plan: what a deploy would do to each machine, and how it drifted. Changes no machine.

The machine's state is read as its SSH user (no sudo, no lock), in one round trip. Its new
system is built on the controller when that is where it is built (`build_on = "local"`), so
the package changes can be listed (`nix store diff-closures`) against the system it runs, when
the controller's store still has that one (e.g. from the deploy that put it there).
"""

from __future__ import annotations

from typing import Any

from pyinfra import host
from pyinfra.api import FunctionCommand, operation

from facts.machine import Machine, MachineState, system_links
from flakefleet import builds, nix, report
from flakefleet.plan import MachinePlan, plan, render

WIDTH = 8  # machine names are padded to this in the plan's lines


def read_state() -> MachineState:
    """The machine's systems and generations, as its SSH user sees them."""
    profile, running = system_links(host.data)
    return host.get_fact(Machine, profile=profile, running=running)


@operation(is_idempotent=False)
def show(system: nix.System, machine: MachineState):
    """Record the machine's plan for the end of the run (`--> flakefleet plan`)."""
    yield FunctionCommand(_show, (system, machine, plan(machine, system.out)), {})


def _show(
    state: Any, host: Any, system: nix.System, machine: MachineState, machine_plan: MachinePlan
) -> bool:
    packages: list[str] = []
    if machine_plan.verdict == "would switch":
        packages = _package_changes(state, host.name, machine.current_system, system)
    width = max(WIDTH, *(len(each.name) for each in state.inventory))
    report.outcome(host.name).plan = render(host.name, machine_plan, packages, width)
    return True


def _package_changes(state: Any, name: str, running: str | None, system: nix.System) -> list[str]:
    if running is None:
        return []  # a first deploy: everything is new
    fleet = builds.for_run(state)
    if fleet.placement(name).kind != "local":
        return ["(no package list: built elsewhere; deploy/build.py builds it)"]
    try:
        fleet.build(name)
    except nix.NixError as error:
        return [f"(no package list: the build failed: {error})"]
    changes = nix.diff_closures(running, system.out)
    if changes is None:
        return [f"(no package list: this controller's store lacks {running})"]
    return changes or ["(no package changes)"]
