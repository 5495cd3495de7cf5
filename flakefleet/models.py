"""What flakefleet knows about machines, as plain values: classes, goals, systems, generations
and /var/src. Facts fill them (``facts/``), the library and operations decide on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import StrEnum

# The profile holding a NixOS or nix-darwin machine's generations, and what it runs and booted.
SYSTEM_PROFILE = "/nix/var/nix/profiles/system"
RUNNING_SYSTEM = "/run/current-system"
BOOTED_SYSTEM = "/run/booted-system"

SOURCES_ROOT = "/var/src"
# Where a login without root keeps its sources (a home-manager machine cannot write /var/src).
USER_SOURCES_ROOT = "$HOME/.var/src"
# flakefleet's own directory in /var/src: its presence is the marker that flakefleet manages
# this /var/src, and it holds every source's trees, one per content digest.
STORE_DIR = ".flakefleet"


def sources_undo_file(root: str, run_id: str) -> str:
    """Where a run's sync remembers what it replaced in /var/src (`root`), for the activation
    worker to put back if the deploy is rolled back; a later sync replaces it."""
    return f"{root}/{STORE_DIR}/.undo/{run_id}"


class MachineClass(StrEnum):
    """What a machine runs: a NixOS system, a nix-darwin system, or a home-manager profile."""

    NIXOS = "nixos"
    DARWIN = "darwin"
    HOME = "home"


class Goal(StrEnum):
    """What a deploy makes of a machine's new system (`nixos-rebuild`'s actions)."""

    SWITCH = "switch"
    BOOT = "boot"
    TEST = "test"
    DRY_ACTIVATE = "dry-activate"
    BUILD = "build"

    @property
    def sets_profile(self) -> bool:
        """Whether the profile gains the system as a generation (the next boot runs it)."""
        return self in (Goal.SWITCH, Goal.BOOT)

    @property
    def runs_new_system(self) -> bool:
        """Whether the machine runs the new system afterwards: it is checked, then confirmed."""
        return self in (Goal.SWITCH, Goal.TEST)

    @property
    def activates(self) -> bool:
        """Whether the goal runs anything on the machine beyond copying the closure."""
        return self is not Goal.BUILD

    def supported_by(self, machine_class: MachineClass) -> bool:
        return self in CLASS_GOALS[machine_class]

    def unsupported(self, machine_class: MachineClass) -> str | None:
        """Why a machine of `machine_class` cannot reach this goal, or None when it can."""
        if self.supported_by(machine_class):
            return None
        supported = ", ".join(CLASS_GOALS[machine_class])
        return f"{machine_class} machines cannot {str(self)!r} (only {supported})"

    def reached(self, machine: MachineState, system: str) -> bool:
        """Whether the machine already is where this goal would put it."""
        running = machine.current_system == system
        selected = machine.profile_system == system
        return {
            Goal.SWITCH: running and selected,
            Goal.BOOT: selected,
            Goal.TEST: running,
            Goal.DRY_ACTIVATE: False,  # changes nothing, so it always runs
            Goal.BUILD: running or selected,
        }[self]


# Goals each machine class supports (nix-darwin and home-manager only ever switch).
CLASS_GOALS: dict[MachineClass, tuple[Goal, ...]] = {
    MachineClass.NIXOS: tuple(Goal),
    MachineClass.DARWIN: (Goal.SWITCH, Goal.DRY_ACTIVATE, Goal.BUILD),
    MachineClass.HOME: (Goal.SWITCH, Goal.BUILD),
}


class Shown:
    """A value `pyinfra inventory.py fact ...` can print (pyinfra asks for `to_json`)."""

    def to_json(self) -> dict[str, object]:
        values = {each.name: getattr(self, each.name) for each in fields(self)}  # type: ignore[arg-type]
        return {k: sorted(v) if isinstance(v, frozenset) else v for k, v in values.items()}


@dataclass(frozen=True)
class Generation(Shown):
    """One generation of a Nix profile, as `nix-env --list-generations` shows it."""

    number: int
    created: str
    current: bool
    system: str | None = None  # the store path the generation links to


@dataclass(frozen=True)
class VarSrc(Shown):
    """What /var/src holds: whether flakefleet manages it, and each source's content digest
    (None for an entry flakefleet did not put there).

    `live` names the directory in the store each managed source points to (its digest, or
    ``<digest>.<n>`` after a resync rebuilt a tree with an unchanged digest); `stored` names
    every source directory in the store, linked or not (an interrupted first sync leaves one).
    """

    exists: bool = False
    managed: bool = False
    sources: dict[str, str | None] = field(default_factory=dict)
    root: str = SOURCES_ROOT
    empty: bool = False
    live: dict[str, str] = field(default_factory=dict)
    stored: frozenset[str] = frozenset()


@dataclass(frozen=True)
class KeyOnMachine(Shown):
    """A key the machine's manifest lists (`flakefleet.keys`): the digest uploaded, where, and
    what lies there now (`permissions`, `owner`, `group` empty when the file is missing: a
    reboot emptied its tmpfs, or someone removed it)."""

    digest: str
    destination: str
    permissions: str = ""
    owner: str = ""
    group: str = ""


@dataclass(frozen=True)
class MachineState(Shown):
    """A machine's systems, generations, Nix, /var/src and keys, as one snapshot."""

    current_system: str | None = None
    booted_system: str | None = None
    profile_system: str | None = None
    generations: list[Generation] = field(default_factory=list)
    var_src: VarSrc = field(default_factory=VarSrc)
    keys: dict[str, KeyOnMachine] = field(default_factory=dict)

    def has_closure(self, system: str) -> bool:
        """Whether the system's closure is surely on the machine (it runs or boots it)."""
        return system in (self.current_system, self.profile_system)


@dataclass(frozen=True)
class PreflightState(Shown):
    """The machine's state, and whether its deploy lock is free (else who holds it)."""

    lock_free: bool
    lock_holder: str
    machine: MachineState
    serial: str = ""  # the lock's last taker when it was read free (flakefleet.lock)
    activations_in_progress: int = 0  # live workers still activating or awaiting confirmation
    dead_workers: int = 0  # workers that died in a busy phase (now marked failed)
    sudo_refusal: str | None = None  # why sudo would not run the preflight (nothing ran)
    lock_problem: str | None = None  # why no lock could be taken safely (nothing changed)
    machine_id: str = ""  # /etc/machine-id (a Mac's hardware UUID), "" if it has none
    other: bool = False  # not the machine id expected (flakefleet.identity): nothing was done
