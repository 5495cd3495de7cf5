"""Where each machine stands (deploy/status.py): what it runs, since when, from which
revision and by whom, whether the flake would change it, a pending reboot, failed units.

Worked out from one snapshot of the machine, the tail of its deploy history
(`flakefleet.records`) and the system the flake gives it now.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from flakefleet.drift import assess, name_of
from flakefleet.models import MachineState
from flakefleet.records import Entry, deployed


@dataclass(frozen=True)
class MachineStatus:
    """One machine's row."""

    machine: str
    machine_class: str
    roles: tuple[str, ...]
    system: str | None  # what it runs
    generation: int | None  # the generation holding it, if one does
    since: str | None  # that generation's date
    revision: str | None  # the flake's commit it was deployed from (its deploy record)
    dirty: bool
    deployed_by: str | None
    verdict: str  # up to date, would switch, would select (flakefleet.drift)
    reboot_pending: bool  # a reboot would bring up another system, kernel or initrd
    failed_units: tuple[str, ...] | None  # None: no systemd to ask
    drift: tuple[str, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def status_of(
    name: str,
    machine_class: str,
    roles: Sequence[str],
    machine: MachineState,
    history: Sequence[Entry],
    failed_units: Sequence[str] | None,
    reboot_pending: bool,
    evaluated: str,
) -> MachineStatus:
    """The row of machine `name` in `machine`'s state, whose flake now gives `evaluated`."""
    running = machine.current_system
    holding = [g for g in machine.generations if running and g.system == running]
    generation = max(holding, key=lambda g: (g.current, g.number), default=None)
    record = deployed(list(history), running) if running else None
    assessment = assess(machine, evaluated)
    return MachineStatus(
        machine=name,
        machine_class=machine_class,
        roles=tuple(roles),
        system=running,
        generation=generation.number if generation else None,
        since=generation.created if generation else None,
        revision=record.revision if record else None,
        dirty=record.dirty if record else False,
        deployed_by=record.by if record else None,
        verdict=assessment.verdict,
        # A boot default it does not run (a `boot` deploy), or another kernel to boot.
        reboot_pending=reboot_pending or machine.profile_system not in (None, running),
        failed_units=tuple(failed_units) if failed_units is not None else None,
        drift=tuple(assessment.drift),
    )


def render(status: MachineStatus, widths: tuple[int, int]) -> list[str]:
    """The status lines of one machine: a row, then its drift. `widths`: of the machine names
    and of the roles, in the whole run (so the columns line up).

    Example: ``web1      nixos   web      up to date    gen 7, 2026-12-01 05:20:11
    nixos-system-web1-3  1366369d by alice@laptop``.
    """
    name_width, roles_width = widths
    where = f"gen {status.generation}, {status.since}" if status.generation else "no generation"
    if status.deployed_by is None:
        origin = "no deploy record"  # deployed by hand, or before flakefleet kept records
    elif status.revision:
        dirty = " (dirty)" if status.dirty else ""
        origin = f"{status.revision[:8]}{dirty} by {status.deployed_by}"
    else:
        origin = f"not from git, by {status.deployed_by}"
    fields = [
        f"{status.machine:<{name_width}}",
        f"{status.machine_class:<6}",
        f"{','.join(status.roles) or '-':<{roles_width}}",
        f"{status.verdict:<12}",
        where,
        name_of(status.system),
        origin,
    ]
    if status.reboot_pending:
        fields.append("reboot pending")
    if status.failed_units:
        fields.append(f"failed units: {', '.join(status.failed_units)}")
    indent = " " * (name_width + 2)
    return ["  ".join(fields), *(f"{indent}drift: {phrase}" for phrase in status.drift)]
