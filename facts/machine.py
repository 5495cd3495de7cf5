"""Everything a deploy decides on, read from a machine in one round trip."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pyinfra.api import FactBase

from facts.nix import (
    RUNNING_SYSTEM,
    SYSTEM_PROFILE,
    BootedSystem,
    CurrentSystem,
    Generation,
    NixVersion,
    SystemGenerations,
    SystemProfile,
)
from facts.sources import Sources, VarSrc
from flakefleet import lock, nix, sudo

SECTION = "@@flakefleet-fact "


@dataclass(frozen=True)
class MachineState:
    """A machine's systems, generations, Nix and /var/src, as one snapshot."""

    current_system: str | None = None
    booted_system: str | None = None
    profile_system: str | None = None
    generations: list[Generation] = field(default_factory=list)
    nix_version: str | None = None
    var_src: VarSrc = field(default_factory=VarSrc)


def system_links(data: Mapping[str, Any]) -> tuple[str, str]:
    """The profile the machine `data` describes keeps its generations in, and the link to what
    it runs (a home-manager machine runs what its profile selects)."""
    machine_class = data.get("machine_class", "nixos")
    profile = nix.profile_path(machine_class, data.get("ssh_user") or "root")
    return profile, profile if machine_class == "home" else RUNNING_SYSTEM


# The facts MachineState is made of, by the field each one fills.
PARTS: dict[str, type[FactBase]] = {
    "current_system": CurrentSystem,
    "booted_system": BootedSystem,
    "profile_system": SystemProfile,
    "generations": SystemGenerations,
    "nix_version": NixVersion,
    "var_src": Sources,
}


class Machine(FactBase[MachineState]):
    """Runs every fact in PARTS as one command, each output behind a section line.

    `profile` is the profile holding the machine's generations (the system profile, or a
    home-manager user's), `running` what links to the system it runs (a home-manager machine
    runs what its profile selects).
    """

    @staticmethod
    def default() -> MachineState:
        return MachineState()

    def command(self, profile: str = SYSTEM_PROFILE, running: str = RUNNING_SYSTEM) -> str:
        commands = {
            "current_system": CurrentSystem().command(running),
            "booted_system": BootedSystem().command(),
            "profile_system": SystemProfile().command(profile),
            "generations": SystemGenerations().command(profile),
            "nix_version": NixVersion().command(),
            "var_src": Sources().command(),
        }
        return "; ".join(f"echo '{SECTION}{name}'; {{ {commands[name]}; }}" for name in PARTS)

    def process(self, output: list[str]) -> MachineState:
        sections: dict[str, list[str]] = {}
        current: list[str] | None = None
        for line in output:
            if line.startswith(SECTION):
                current = sections.setdefault(line[len(SECTION) :].strip(), [])
            elif current is not None:
                current.append(line)
        values = {}
        for name, fact in PARTS.items():
            lines = sections.get(name, [])
            instance = fact()
            values[name] = instance.process(lines) if lines else instance.default()
        return MachineState(**values)


@dataclass(frozen=True)
class PreflightState:
    """The machine's state, and whether this deploy now holds its lock (else who does)."""

    lock_acquired: bool
    lock_holder: str
    machine: MachineState
    activations_in_progress: int = 0  # workers still activating or awaiting confirmation
    sudo_refusal: str | None = None  # why sudo would not run the preflight (nothing ran)


class Preflight(FactBase[PreflightState]):
    """Take the machine's deploy lock and read its state, in one round trip, as root.

    Output: ``lock acquired`` or ``lock held <holder>``, the number of activations still in
    progress, then the ``Machine`` fact's sections; or, when sudo refuses (`become`), only
    its reason behind ``sudo.REFUSED``.
    """

    @staticmethod
    def default() -> PreflightState:
        return PreflightState(lock_acquired=False, lock_holder="", machine=MachineState())

    def command(
        self,
        lock_dir: str,
        holder: str,
        profile: str = SYSTEM_PROFILE,
        running: str = RUNNING_SYSTEM,
        become: sudo.Become = sudo.Become.ROOT,
        nix_dir: str | None = None,
    ) -> str:
        busy = (
            f"cat {lock_dir}/activation/*/phase 2>/dev/null"
            " | grep -c -x -e running -e awaiting-confirmation"
        )
        machine = Machine().command(profile, running)
        script = f"{lock.acquire_command(lock_dir, holder)}; {busy}; {machine}"
        return sudo.gate(become, sudo.nix_on_path(nix_dir, script))

    def process(self, output: list[str]) -> PreflightState:
        first = output[0].strip() if output else ""
        if first.startswith(sudo.REFUSED.strip()):
            refusal = first.removeprefix(sudo.REFUSED.strip()).strip() or "sudo refused"
            return PreflightState(False, "", MachineState(), sudo_refusal=refusal)
        busy = output[1].strip() if len(output) > 1 else "0"
        return PreflightState(
            lock_acquired=first == "lock acquired",
            lock_holder=first.removeprefix("lock held").strip(),
            machine=Machine().process(output[2:]),
            activations_in_progress=int(busy) if busy.isdigit() else 0,
        )
