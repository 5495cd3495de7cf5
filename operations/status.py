"""The status: one row per machine saying where it stands (see ``flakefleet.status``).
Changes no machine and takes no lock.

The machine is read in one round trip, as root where its deploy history lives (it is root's
only; a home-manager user's is the user's own), through the same sudo path as a deploy.
"""

from __future__ import annotations

from typing import Any

from pyinfra import host, state
from pyinfra.api import FunctionCommand, operation

from facts.machine import Standing, StatusSnapshot
from flakefleet import nix
from flakefleet.models import MachineClass
from flakefleet.run import Run
from flakefleet.status import render, status_of
from operations.plan import WIDTH
from operations.refuse import read_as_root


def read() -> Standing | None:
    """The machine's snapshot, deploy history and failed units; None when sudo refuses (the
    machine is failed with sudo's reason). A sudo password is asked for as a deploy asks."""
    target = Run.of(state).target(host.name)
    return read_as_root(
        "Status",
        StatusSnapshot,
        profile=target.profile,
        running=target.running_link,
        history=target.history,
        system=target.machine_class is not MachineClass.HOME,  # a home is the user's, only
    )


@operation(is_idempotent=False)
def show(system: nix.System, standing: Standing):
    """Record the machine's status row for the end of the run (`--> flakefleet plan`) and in
    the JSON report (`state`)."""
    yield FunctionCommand(_show, (system, standing), {})


def _show(state: Any, host: Any, system: nix.System, standing: Standing) -> bool:
    run = Run.of(state)
    target = run.target(host.name)
    row = status_of(
        host.name,
        str(target.machine_class),
        host.data.get("roles") or (),
        standing.machine,
        standing.history,
        standing.failed_units,
        standing.reboot_pending,
        system.out,
    )
    width = max(WIDTH, *(len(each.name) for each in state.inventory))
    roles = max(1, *(len(",".join(each.data.get("roles") or ())) for each in state.inventory))
    outcome = run.outcome(host.name)
    outcome.plan = render(row, (width, roles))
    outcome.state = row.as_dict()
    return True
