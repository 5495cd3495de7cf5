"""The plan: what a deploy would do to each machine, and how it drifted. Changes no machine.

The machine's state is read as its SSH user (no sudo, no lock), in one round trip. Its new
system is built on the controller when that is where it is built (`build_on = "local"`), so
the package changes can be listed (`nix store diff-closures`) against the system it runs, when
the controller's store still has that one (e.g. from the deploy that put it there).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pyinfra import host, state
from pyinfra.api import FunctionCommand, operation

from facts.machine import MachineSnapshot
from flakefleet import nix
from flakefleet.drift import Assessment, assess, render
from flakefleet.models import MachineState
from flakefleet.run import Run

WIDTH = 8  # machine names are padded to this in the plan's lines


def read_state() -> MachineState:
    """The machine's systems and generations, as its SSH user sees them."""
    target = Run.of(state).target(host.name)
    return target.read(
        host, MachineSnapshot, as_root=False, profile=target.profile, running=target.running_link
    )


@operation(is_idempotent=False)
def show(system: nix.System, machine: MachineState):
    """Record the machine's plan for the end of the run (`--> flakefleet plan`)."""
    yield FunctionCommand(_show, (system, machine, assess(machine, system.out)), {})


def _show(
    state: Any, host: Any, system: nix.System, machine: MachineState, assessment: Assessment
) -> bool:
    run = Run.of(state)
    packages: list[str] = []
    if not assessment.up_to_date:
        packages = [f"system: {system.out}", f"derivation: {system.drv}"]
    if assessment.verdict == "would switch":
        packages += _package_changes(run, host.name, machine.current_system, system)
    width = max(WIDTH, *(len(each.name) for each in state.inventory))
    run.outcome(host.name).plan = render(host.name, assessment, packages, width)
    return True


def _package_changes(run: Run, name: str, running: str | None, system: nix.System) -> list[str]:
    if running is None:
        return []  # a first deploy: everything is new
    if run.builds.placement(name).kind != "local":
        return ["(no package list: built elsewhere; deploy/build.py builds it)"]
    if not Path(system.out).exists():
        fetched = nix.downloads(system.drv, run.settings(name).nix_options)
        if fetched:  # offline, such a build would spend minutes on retries before failing
            shown = ", ".join(fetched[:3]) + (", ..." if len(fetched) > 3 else "")
            return [
                f"(no package list: the build would first download {len(fetched)} sources "
                f"({shown}); deploy/build.py builds it)"
            ]
    try:
        run.builds.build(name)
    except nix.NixError as error:
        return [f"(no package list: the build failed: {error})"]
    changes = nix.diff_closures(running, system.out)
    if changes is None:
        return [f"(no package list: this controller's store lacks {running})"]
    return changes or ["(no package changes)"]
