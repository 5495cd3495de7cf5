"""A machine's system on its way to the machine: evaluate it, build it, copy its closure.

Each operation compares the machine's state (read once, by ``facts.machine.Machine``) with the
evaluated system and does nothing when the machine already has it.
"""

from __future__ import annotations

from typing import Any

from pyinfra import host, state
from pyinfra.api import FunctionCommand, operation

from facts.machine import MachineState
from flakefleet import builds, nix, report
from flakefleet.ssh import ssh_destination, ssh_options


def has_closure(machine: MachineState, system: str) -> bool:
    """Whether the system's closure is surely on the machine (it runs or boots it)."""
    return system in (machine.current_system, machine.profile_system)


def evaluate(machine: MachineState) -> nix.System | None:
    """The machine's system, evaluated with every other selected machine in one Nix call.

    A machine that lacks its system is marked for the run's one build. On failure the machine
    gets an operation that fails it with the reason, and None is returned so the deploy file
    skips its other steps.
    """
    fleet = builds.for_run(state)
    try:
        system = fleet.system(host.name)
    except nix.NixError as error:
        _fail(name="Evaluate the system", reason=str(error))
        return None
    report.outcome(host.name).system = system.out
    if not has_closure(machine, system.out):
        fleet.need(host.name)
    return system


@operation(is_idempotent=False)
def _fail(reason: str):
    yield report.stop(reason)


@operation()
def build(system: nix.System, machine: MachineState):
    """Build the machine's system on the controller, unless the machine already has it.

    Every machine of the run that needs a build is built by one ``nix-store --realise``.
    """
    if has_closure(machine, system.out):
        host.noop(f"{host.name} already has {system.out}")
        return
    yield FunctionCommand(_build, (system,), {})


def _build(state: Any, host: Any, system: nix.System) -> bool:
    try:
        builds.for_run(state).build(host.name)
    except nix.NixError as error:
        report.failed(host.name, f"build: {error}")
        return False
    return True


@operation()
def copy(system: nix.System, machine: MachineState):
    """Copy the system's closure to the machine: only the store paths it lacks are sent."""
    if has_closure(machine, system.out):
        host.noop(f"{host.name} already has the closure of {system.out}")
        return
    yield FunctionCommand(_copy, (system.out,), {})


def _copy(state: Any, host: Any, path: str) -> bool:
    options = {str(k): str(v) for k, v in (host.data.get("nix_options") or {}).items()}
    try:
        sent = nix.copy_closure(
            path, ssh_destination(host.data, host.name), ssh_options(host.data), options
        )
    except nix.NixError as error:
        report.failed(host.name, f"copy: {error}")
        return False
    report.changed(host.name, f"copied {sent} paths")
    return True
