"""Everything a deploy decides on, read from a machine in one round trip."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

from pyinfra.api import FactBase

from facts.keys import Keys
from facts.nix import (
    BootedSystem,
    CurrentSystem,
    SystemGenerations,
    SystemProfile,
    needs_reboot_command,
)
from facts.sources import Sources
from flakefleet import lock, services, sudo, worker
from flakefleet.identity import MACHINE_ID_COMMAND
from flakefleet.models import (
    BOOTED_SYSTEM,
    RUNNING_SYSTEM,
    SYSTEM_PROFILE,
    MachineState,
    PreflightState,
)
from flakefleet.records import Entry, parse_history
from flakefleet.target import RemoteFact

SECTION = "@@flakefleet-fact "

# The facts MachineState is made of, by the field each one fills.
PARTS: dict[str, type[FactBase[Any]]] = {
    "current_system": CurrentSystem,
    "booted_system": BootedSystem,
    "profile_system": SystemProfile,
    "generations": SystemGenerations,
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
    def script(
        profile: str = SYSTEM_PROFILE, running: str = RUNNING_SYSTEM, sources: str = ""
    ) -> str:
        """`sources`: the sources root (`Target.sources_root`), for a reader that is not the
        deploy's user (the plan reads without sudo)."""
        commands = {
            "current_system": CurrentSystem().command(running),
            "booted_system": BootedSystem().command(),
            "profile_system": SystemProfile().command(profile),
            "generations": SystemGenerations().command(profile),
            "var_src": Sources().command(sources),
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


def sudo_refusal(first: str) -> str | None:
    """sudo's reason, when a command read with `gate` was refused (its only line)."""
    if not first.startswith(sudo.REFUSED.strip()):
        return None
    return first.removeprefix(sudo.REFUSED.strip()).strip() or "sudo refused"


class Preflight(RemoteFact[PreflightState]):
    """Read the machine's state and whether its deploy lock is free, in one round trip, as
    root. The lock is taken later, only if the deploy has work on the machine
    (``operations.preflight.changes_machine``).

    The lock counts as busy while an activation worker is busy on the machine, whoever holds
    the lock: the machine is in that worker's hands until it succeeds or rolls back.

    It first reads the machine id; when `machine_id` (the one expected, see
    ``flakefleet.identity``) is given and differs, it stops there: nothing is touched.

    Output: ``identity <machine id>``, ``workers <busy> <dead>``, then ``lock free <serial>``,
    ``lock held <holder>`` or ``lock busy <holder>``, then the ``MachineSnapshot`` sections. Or
    ``identity <machine id>`` and ``identity differs``. Or only one line: sudo's reason behind
    ``sudo.REFUSED`` when it refuses (read with ``gate``), or ``lock failed: <reason>`` when no
    lock can be taken safely (see ``flakefleet.lock``).
    """

    @staticmethod
    def default() -> PreflightState:
        return PreflightState(lock_free=False, lock_holder="", machine=MachineState())

    @staticmethod
    def script(
        lock_dir: str = "/run/flakefleet",
        profile: str = SYSTEM_PROFILE,
        running: str = RUNNING_SYSTEM,
        machine_id: str = "",
    ) -> str:
        machine = MachineSnapshot.script(profile, running)
        expected = shlex.quote(machine_id)
        workers = worker.workers_command(lock_dir)
        busy = f'echo "lock busy $(cat {lock_dir}/lock/holder 2>/dev/null)"'
        free = lock.status_command(lock_dir)
        return (
            f'i=$({MACHINE_ID_COMMAND}); echo "identity $i"; '
            f'if [ -n {expected} ] && [ "$i" != {expected} ]; then echo "identity differs"; '
            "exit 0; fi; "
            f"{lock.state_dir_command(lock_dir)}; "
            f'w=$({workers}); echo "$w"; b=${{w#workers }}; '
            f'if [ "${{b%% *}}" -gt 0 ]; then {busy}; else {free}; fi; {machine}'
        )

    def process(self, output: list[str]) -> PreflightState:
        first = output[0].strip() if output else ""
        refusal = sudo_refusal(first)
        if refusal:
            return PreflightState(False, "", MachineState(), sudo_refusal=refusal)
        machine_id = first.removeprefix("identity").strip() if first.startswith("identity") else ""
        if first.startswith("identity"):
            output = output[1:]
            first = output[0].strip() if output else ""
        if first == "identity differs":
            return PreflightState(False, "", MachineState(), machine_id=machine_id, other=True)
        if first.startswith("lock failed:"):
            problem = first.removeprefix("lock failed:").strip()
            return PreflightState(False, "", MachineState(), lock_problem=problem)
        status = output[1].strip() if len(output) > 1 else ""
        if status.startswith("lock failed:"):
            problem = status.removeprefix("lock failed:").strip()
            return PreflightState(False, "", MachineState(), lock_problem=problem)
        counts = first.split()[1:3] if first.startswith("workers ") else []
        busy, dead = (int(n) for n in counts) if len(counts) == 2 else (0, 0)
        free = status.startswith("lock free")
        return PreflightState(
            lock_free=free,
            lock_holder=""
            if free
            else status.removeprefix("lock held").removeprefix("lock busy").strip(),
            serial=status.removeprefix("lock free").strip() if free else "",
            machine=MachineSnapshot().process(output[2:]),
            activations_in_progress=busy,
            dead_workers=dead,
            machine_id=machine_id,
        )


@dataclass(frozen=True)
class Standing:
    """What deploy/status.py reads from a machine: its snapshot, the tail of its deploy
    history, and its failed units (None where there is no systemd to ask)."""

    machine: MachineState
    history: list[Entry]
    failed_units: list[str] | None
    reboot_pending: bool = False  # a reboot would bring up another system, kernel or initrd
    sudo_refusal: str | None = None  # why sudo would not run it (nothing was read)


# systemd's failed units, one a line, then a marker; "no systemd" where there is none to ask.
FAILED_UNITS = (
    "if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then "
    "systemctl --failed --no-legend --plain 2>/dev/null | awk '{ print $1 }'; echo '(units)'; "
    "else echo '(no systemd)'; fi"
)


class StatusSnapshot(RemoteFact[Standing]):
    """The machine's snapshot, the last `entries` lines of its deploy history (`history`:
    Target.history, read as its owner) and its failed units, in one command."""

    @staticmethod
    def default() -> Standing:
        return Standing(MachineState(), [], None)

    @staticmethod
    def script(
        profile: str = SYSTEM_PROFILE,
        running: str = RUNNING_SYSTEM,
        history: str = "/var/lib/flakefleet/history.jsonl",
        entries: int = 200,
        system: bool = True,
    ) -> str:
        """`system`: the machine's own system (its units, its reboots), not a user's home."""
        # `~/` stays unquoted: the login's home, expanded there.
        path = history if history.startswith("~/") else shlex.quote(history)
        failed = FAILED_UNITS if system else "echo '(no systemd)'"
        # What a reboot would bring up is the profile's system (the boot default); compared
        # with the booted one's kernel, initrd and modules (none known: nothing booted yet).
        compare = needs_reboot_command(f'"$(readlink -f {shlex.quote(profile)})"')
        reboot = f"if [ -e {BOOTED_SYSTEM} ]; then {compare}; else echo no-booted-system; fi"
        return (
            f"{MachineSnapshot.script(profile, running)}; "
            f"echo '{SECTION}history'; tail -n {entries} {path} 2>/dev/null; "
            f"echo '{SECTION}reboot'; {reboot if system else 'echo not-needed'}; "
            f"echo '{SECTION}units'; {failed}"
        )

    def process(self, output: list[str]) -> Standing:
        refusal = sudo_refusal(output[0].strip() if output else "")
        if refusal:
            return Standing(MachineState(), [], None, sudo_refusal=refusal)
        ours = {"snapshot": 0}  # where each section starts; the snapshot's own come first
        for index, line in enumerate(output):
            name = line[len(SECTION) :].strip() if line.startswith(SECTION) else ""
            if name in ("history", "reboot", "units"):
                ours[name] = index
        bounds = [*sorted(ours.values()), len(output)]
        sections = {
            name: output[start + (name != "snapshot") : bounds[bounds.index(start) + 1]]
            for name, start in ours.items()
        }
        unit_lines = [line.strip() for line in sections.get("units", [])]
        units: list[str] | None = None
        if "(units)" in unit_lines:
            units = [line for line in unit_lines[: unit_lines.index("(units)")] if line]
        reboot = [line.strip() for line in sections.get("reboot", []) if line.strip()]
        return Standing(
            machine=MachineSnapshot().process(sections["snapshot"]),
            history=parse_history("\n".join(sections.get("history", []))),
            failed_units=units,
            reboot_pending=reboot[-1:] == ["needed"],
        )


@dataclass(frozen=True)
class Planned:
    """What deploy/plan.py reads from a machine: its snapshot, and what `switch-to-configuration
    dry-activate` of the new system says of services (None, with the reason in
    `services_unknown`, where it was not asked)."""

    machine: MachineState
    services: dict[str, list[str]] | None = None
    services_unknown: str | None = None
    sudo_refusal: str | None = None  # why sudo would not run it (nothing was read)


# Why dry-activate was not asked, by what the script printed instead.
NOT_ASKED = {
    "(runs it)": None,  # up to date: nothing to tell
    "(absent)": "the new system is not on the machine yet: deploy/build.py copies it there",
}


class PlanSnapshot(RemoteFact[Planned]):
    """The machine's snapshot, then, when `system` (a NixOS system's store path) is given and
    the machine has it without running it, what its ``switch-to-configuration dry-activate``
    prints, and ``(status N)``. Read as root: the keys' manifest is root's, and dry-activate
    runs as root, as `nixos-rebuild dry-activate` runs it; it changes nothing."""

    @staticmethod
    def default() -> Planned:
        return Planned(MachineState())

    @staticmethod
    def script(
        profile: str = SYSTEM_PROFILE, running: str = RUNNING_SYSTEM, sources: str = "",
        system: str = "",
    ) -> str:  # fmt: skip
        new = shlex.quote(system)
        switch = f"{new}/bin/switch-to-configuration"
        dry_activate = (
            f'if [ "$(readlink -f {shlex.quote(running)})" = {new} ]; then echo "(runs it)"; '
            f"elif [ ! -x {switch} ]; then echo '(absent)'; "
            f'else {switch} dry-activate 2>&1; echo "(status $?)"; fi'
        )
        return f"{MachineSnapshot.script(profile, running, sources)}" + (
            f"; echo '{SECTION}dry-activate'; {dry_activate}" if system else ""
        )

    def process(self, output: list[str]) -> Planned:
        refusal = sudo_refusal(output[0].strip() if output else "")
        if refusal:
            return Planned(MachineState(), sudo_refusal=refusal)
        marker = f"{SECTION}dry-activate"
        at = next((i for i, line in enumerate(output) if line.strip() == marker), len(output))
        machine = MachineSnapshot().process(output[:at])
        told = [line.rstrip("\n") for line in output[at + 1 :]]
        if at == len(output):
            return Planned(machine)
        last = told[-1].strip() if told else ""
        if last in NOT_ASKED:
            return Planned(machine, services_unknown=NOT_ASKED[last])
        if last != "(status 0)":
            failed = next((line for line in reversed(told[:-1]) if line.strip()), last)
            return Planned(machine, services_unknown=f"dry-activate failed: {failed.strip()}")
        return Planned(machine, services=services.told(told[:-1]))
