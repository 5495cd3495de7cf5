"""The plan: what a deploy would do to each machine, and how it drifted. Changes no machine.

The machine's state is read in one round trip, as root (its keys' manifest is root's), with no
lock: its systems, generations, sources and keys, and, for a NixOS machine that already has its
new system (``deploy/build.py`` put it there), what ``switch-to-configuration dry-activate``
says the switch would do to its services. Its new system is built on the controller when that
is where it is built (`build_on = "local"`), so the package changes can be listed (`nix store
diff-closures`), the closure sizes compared and the new kernel, initrd and modules compared
with the booted ones, when the controller's store still has what the machine runs and booted
(e.g. from the deploy that put it there). Its sources are compared by digest
(``flakefleet.sources.plan``), its keys by keyed digest (``flakefleet.keys.plan``).
"""

from __future__ import annotations

import os
from contextlib import suppress
from pathlib import Path
from typing import Any

from pyinfra import host, state
from pyinfra.api import FunctionCommand, operation

from facts.machine import Planned, PlanSnapshot
from facts.nix import BOOT_PARTS
from flakefleet import keys, nix, services
from flakefleet.drift import Assessment, assess, render
from flakefleet.keys import Key
from flakefleet.models import MachineClass
from flakefleet.run import Run
from flakefleet.sources import MachineSources, RunSources
from flakefleet.sources.plan import describe
from operations.refuse import read_as_root

WIDTH = 8  # machine names are padded to this in the plan's lines


def read_state() -> Planned | None:
    """The machine's systems, generations, sources and keys, and what dry-activate says of its
    new system: one round trip, as root. None when sudo refuses (the machine is failed)."""
    run = Run.of(state)
    target = run.target(host.name)
    new = ""
    if target.machine_class is MachineClass.NIXOS:
        with suppress(nix.NixError):  # closure.evaluate fails the machine with the reason
            new = run.builds.system(host.name).out  # one evaluation for every machine
    return read_as_root(
        "Plan",
        PlanSnapshot,
        profile=target.profile,
        running=target.running_link,
        sources=target.sources_root,
        system=new,
    )


# What the plan says of services where dry-activate cannot tell, by machine class.
NO_DRY_ACTIVATE = {
    MachineClass.DARWIN: "not known (nix-darwin has no dry-activate)",
    MachineClass.HOME: "not known (home-manager has no dry-activate for its services)",
}


@operation(is_idempotent=False)
def show(system: nix.System, planned: Planned, wanted: MachineSources, keys: tuple[Key, ...]):
    """Record the machine's plan for the end of the run (`--> flakefleet plan`)."""
    assessment = assess(planned.machine, system.out)
    yield FunctionCommand(_show, (system, planned, assessment, wanted, keys), {})


def _show(
    state: Any, host: Any, system: nix.System, planned: Planned, assessment: Assessment,
    wanted: MachineSources, declared: tuple[Key, ...],
) -> bool:  # fmt: skip
    run = Run.of(state)
    machine = planned.machine
    details: list[str] = []
    if not assessment.up_to_date:
        details = [f"system: {system.out}", f"derivation: {system.drv}"]
    if assessment.verdict == "would switch":
        details += _package_changes(run, host.name, machine.current_system, system)
        if Path(system.out).exists():  # built here: its size and kernel can be told
            details += [_size_change(machine.current_system, system.out)]
            details += _reboot(machine.booted_system, system.out)
        details += _services(run.target(host.name).machine_class, planned)
    checked = run.sources
    if isinstance(checked, RunSources):
        details += [
            f"sources: {phrase}" for phrase in describe(wanted, machine.var_src, checked.manifest)
        ]
    if declared or machine.keys:
        details += [f"keys: {phrase}" for phrase in keys.plan(declared, machine.keys)]
    width = max(WIDTH, *(len(each.name) for each in state.inventory))
    run.outcome(host.name).plan = render(host.name, assessment, details, width)
    return True


def _services(machine_class: MachineClass, planned: Planned) -> list[str]:
    if machine_class in NO_DRY_ACTIVATE:
        return [f"services: {NO_DRY_ACTIVATE[machine_class]}"]
    if planned.services is not None:
        return [f"services: {services.describe(planned.services)}"]
    if planned.services_unknown:
        return [f"services: not known ({planned.services_unknown})"]
    return []


def _size_change(running: str | None, new: str) -> str:
    after = nix.closure_size(new)
    before = nix.closure_size(running) if running else 0
    if after is None or before is None:
        return "closure: size unknown (this controller's store lacks what it runs)"
    sign = "+" if after >= before else "-"
    return f"closure: {_size(before)} → {_size(after)} ({sign}{_size(abs(after - before))})"


def _size(size: int) -> str:
    """A size for people: ``512 B``, ``12.3 KiB``, ``1.2 GiB``."""
    if size < 1024:
        return f"{size} B"
    value = size / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _reboot(booted: str | None, new: str) -> list[str]:
    """Whether the new system needs a reboot: its kernel, initrd or modules differ from the
    booted system's (read here, from this controller's copy of the booted system)."""
    if booted is None or not Path(booted).exists():
        return []  # nothing booted to compare with, or not in this store: not said
    differ = [
        part
        for part in BOOT_PARTS
        if (Path(booted) / part).exists() or (Path(new) / part).exists()
        if os.path.realpath(Path(booted) / part) != os.path.realpath(Path(new) / part)
    ]
    return [f"reboot needed: new {', '.join(differ)}"] if differ else []


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
