"""What a deploy would do to a machine, and where it stands: worked out from its state and the
system the flake gives it now, without changing anything.

A machine is `up to date`, `would switch` (it runs another system), or `would select` (it runs
the new system, but would boot another one). Besides, a machine has *drifted* when it is not
where flakefleet leaves a machine: its profile selects an older generation than its newest (a
rollback), it runs a system its profile does not select (a `boot` deploy not yet rebooted
into, or a `test`), or it runs a system none of its generations holds (activated by hand).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from flakefleet.models import MachineState


def name_of(path: str | None) -> str:
    """A store path without its directory and hash: ``nixos-system-web1-2``."""
    if not path:
        return "nothing"
    return path.rsplit("/", 1)[-1].split("-", 1)[-1]


@dataclass(frozen=True)
class Assessment:
    """What a deploy would do to one machine (`verdict`), and what else is worth knowing."""

    verdict: str
    change: str = ""  # `from → to`, for a machine that would switch
    drift: list[str] = field(default_factory=list)

    @property
    def up_to_date(self) -> bool:
        return self.verdict == "up to date" and not self.drift


def assess(machine: MachineState, system: str) -> Assessment:
    """The plan for a machine in `machine`'s state whose flake now gives `system`.

    Example: a machine that runs and boots ``…-web1-1`` while the flake gives ``…-web1-2``:
    ``Assessment("would switch", "nixos-system-web1-1 → nixos-system-web1-2")``.
    """
    current, profile = machine.current_system, machine.profile_system
    if current != system:
        verdict, change = "would switch", f"{name_of(current)} → {name_of(system)}"
    elif profile != system:
        verdict, change = "would select", f"boots {name_of(profile)}, would boot {name_of(system)}"
    else:
        verdict, change = "up to date", ""
    return Assessment(verdict, change, drift(machine))


def drift(machine: MachineState) -> list[str]:
    """How the machine differs from where a deploy leaves it, a phrase each."""
    current, profile = machine.current_system, machine.profile_system
    found = []
    generations = machine.generations
    newest = max(generations, key=lambda generation: generation.number, default=None)
    selected = next((generation for generation in generations if generation.current), None)
    if newest and selected and selected.number != newest.number:
        found.append(
            f"its profile selects generation {selected.number}, not the newest "
            f"({newest.number}): rolled back"
        )
    if current and profile and current != profile:
        found.append(f"runs {name_of(current)} but would boot {name_of(profile)}")
    systems = {generation.system for generation in generations}
    known = bool(generations) and None not in systems  # every generation's system was read
    if current and known and current not in systems:
        found.append(f"runs {name_of(current)}, which no generation holds: set by hand?")
    return found


def render(name: str, assessment: Assessment, packages: Sequence[str], width: int) -> list[str]:
    """The plan's lines for one machine: a heading line, then the drift and package changes."""
    heading = f"{name:<{width}}  {assessment.verdict:<12}"
    if assessment.change:
        heading += f"  {assessment.change}"
    lines = [heading.rstrip()]
    indent = " " * (width + 2)
    lines += [f"{indent}drift: {phrase}" for phrase in assessment.drift]
    lines += [f"{indent}{package}" for package in packages]
    return lines
