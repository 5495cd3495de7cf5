"""Everything a deploy decides on, read from a machine in one round trip."""

from __future__ import annotations

from typing import Any

from pyinfra.api import FactBase

from facts.keys import Keys
from facts.nix import (
    BootedSystem,
    CurrentSystem,
    NixVersion,
    SystemGenerations,
    SystemProfile,
)
from facts.sources import Sources
from flakefleet import lock, sudo, worker
from flakefleet.models import RUNNING_SYSTEM, SYSTEM_PROFILE, MachineState, PreflightState
from flakefleet.target import RemoteFact

SECTION = "@@flakefleet-fact "

# The facts MachineState is made of, by the field each one fills.
PARTS: dict[str, type[FactBase[Any]]] = {
    "current_system": CurrentSystem,
    "booted_system": BootedSystem,
    "profile_system": SystemProfile,
    "generations": SystemGenerations,
    "nix_version": NixVersion,
    "var_src": Sources,
    "keys": Keys,
}


class MachineSnapshot(RemoteFact[MachineState]):
    """Runs every fact in PARTS as one command, each output behind a section line.

    `profile` is the profile holding the machine's generations (the system profile, or a
    home-manager user's), `running` what links to the system it runs (a home-manager machine
    runs what its profile selects).
    """

    @staticmethod
    def default() -> MachineState:
        return MachineState()

    @staticmethod
    def script(profile: str = SYSTEM_PROFILE, running: str = RUNNING_SYSTEM) -> str:
        commands = {
            "current_system": CurrentSystem().command(running),
            "booted_system": BootedSystem().command(),
            "profile_system": SystemProfile().command(profile),
            "generations": SystemGenerations().command(profile),
            "nix_version": NixVersion().command(),
            "var_src": Sources().command(),
            "keys": Keys().command(),
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


class Preflight(RemoteFact[PreflightState]):
    """Take the machine's deploy lock and read its state, in one round trip, as root.

    The lock is not taken while an activation worker is busy on the machine, whoever holds
    the lock: the machine is in that worker's hands until it succeeds or rolls back.

    Output: ``workers <busy> <dead>``, then ``lock acquired``, ``lock held <holder>`` or
    ``lock busy <holder>``, then the ``MachineSnapshot`` sections. Or only one line: sudo's
    reason behind ``sudo.REFUSED`` when it refuses (read with ``gate``), or ``lock failed:
    <reason>`` when no lock can be taken safely (see ``flakefleet.lock``).
    """

    @staticmethod
    def default() -> PreflightState:
        return PreflightState(lock_acquired=False, lock_holder="", machine=MachineState())

    @staticmethod
    def script(
        lock_dir: str = "/run/flakefleet",
        holder: str = "",
        profile: str = SYSTEM_PROFILE,
        running: str = RUNNING_SYSTEM,
    ) -> str:
        machine = MachineSnapshot.script(profile, running)
        workers = worker.workers_command(lock_dir)
        busy = f'echo "lock busy $(cat {lock_dir}/lock/holder 2>/dev/null)"'
        acquire = lock.acquire_command(lock_dir, holder)
        return (
            f"{lock.state_dir_command(lock_dir)}; "
            f'w=$({workers}); echo "$w"; b=${{w#workers }}; '
            f'if [ "${{b%% *}}" -gt 0 ]; then {busy}; else {acquire}; fi; {machine}'
        )

    def process(self, output: list[str]) -> PreflightState:
        first = output[0].strip() if output else ""
        if first.startswith(sudo.REFUSED.strip()):
            refusal = first.removeprefix(sudo.REFUSED.strip()).strip() or "sudo refused"
            return PreflightState(False, "", MachineState(), sudo_refusal=refusal)
        if first.startswith("lock failed:"):
            problem = first.removeprefix("lock failed:").strip()
            return PreflightState(False, "", MachineState(), lock_problem=problem)
        status = output[1].strip() if len(output) > 1 else ""
        if status.startswith("lock failed:"):
            problem = status.removeprefix("lock failed:").strip()
            return PreflightState(False, "", MachineState(), lock_problem=problem)
        counts = first.split()[1:3] if first.startswith("workers ") else []
        busy, dead = (int(n) for n in counts) if len(counts) == 2 else (0, 0)
        return PreflightState(
            lock_acquired=status == "lock acquired",
            lock_holder=status.removeprefix("lock held").removeprefix("lock busy").strip(),
            machine=MachineSnapshot().process(output[2:]),
            activations_in_progress=busy,
            dead_workers=dead,
        )
