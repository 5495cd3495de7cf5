"""The machines of the test fleet: read from the roster, remembered in the state directory.

The roster is the example fleet's ``hosts.json``: ``{"web1": {"class": "nixos", "roles": ["web"],
...}, ...}``. Key order is machine order; machine ``i`` gets port ``base + 1 + i``. The testbed
reads ``class``, ``roles``, ``port``, ``user``, ``sudoPassword``, ``nixSize``, ``systemd`` (a
systemd machine, see ``testbed.nspawn``) and ``nix``, the machine's Nix:

- ``"2.8"`` (the default): Debian bookworm's nix-bin, this computer's own, on a namespace machine;
- ``"trixie"`` (Nix 2.26) or ``"sid"`` (Nix 2.34): that Debian suite's nix-bin, in a systemd
  machine's root of that suite (``"systemd": true`` alone means ``"trixie"``).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from testbed.layout import TestbedError

# Names become hostnames, directory names and ssh_config host aliases.
_MACHINE_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
HOST_NIX = "2.8"  # this computer's Nix (Debian bookworm), which namespace machines share
# A systemd machine's Nix is its root's Debian suite's (testbed.template.SUITES).
NIX_VERSIONS = (HOST_NIX, "trixie", "sid")


@dataclass(frozen=True)
class Machine:
    """One machine of the test fleet."""

    name: str
    port: int
    klass: str = "nixos"
    roles: tuple[str, ...] = ()
    service_port: int | None = None  # where the machine's role service answers, if it has one
    user: str = "root"  # the SSH user a deploy logs in as (``deploy`` is a non-root sudoer)
    sudo_password: bool = False  # whether the deploy user's sudo asks for its password
    nix_size: str | None = None  # a size-limited /nix (tmpfs, e.g. "64m"), for disk-full tests
    systemd: bool = False  # systemd as PID 1 in a Debian root (testbed.nspawn)
    nix: str = HOST_NIX  # see NIX_VERSIONS; a systemd machine's is its root's Debian suite
    latency_ms: float | None = None  # the round trip its relay adds (None: no relay)

    @property
    def suite(self) -> str | None:
        """The Debian suite of a systemd machine's root (None for a namespace machine)."""
        return self.nix if self.systemd else None

    @property
    def address(self) -> str:
        """The machine's own loopback address, which its name resolves to inside it.

        Services bind to it, so two test fleets (distinct ssh ports) never collide on a port.
        """
        return f"127.{(self.port >> 8) & 255}.{self.port & 255}.1"

    @property
    def ssh_address(self) -> str:
        """Where a client reaches its sshd: its relay on its own address (``up --latency``),
        else the sshd itself on 127.0.0.1."""
        return self.address if self.latency_ms is not None else "127.0.0.1"


def load_roster(path: Path, base_port: int) -> list[Machine]:
    """Read the roster file; machine ``i`` listens on ``base_port + 1 + i``.

    Example: ``load_roster(Path("example/hosts.json"), 22400)[0].port == 22401``.
    """
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise TestbedError(f"roster {path} does not exist (pass --roster)") from None
    except (OSError, ValueError) as error:
        raise TestbedError(f"roster {path} is not readable JSON: {error}") from None
    if not isinstance(data, dict) or not data:
        raise TestbedError(f"roster {path} must be a non-empty JSON object of machines")
    machines = []
    for index, (name, attrs) in enumerate(data.items()):
        if not _MACHINE_NAME.fullmatch(name):
            raise TestbedError(f"roster {path}: {name!r} is not a valid machine name")
        if not isinstance(attrs, dict):
            raise TestbedError(f"roster {path}: {name} must map to an object")
        klass = attrs.get("class", "nixos")
        roles = attrs.get("roles", [])
        if not isinstance(klass, str) or not (
            isinstance(roles, list) and all(isinstance(role, str) for role in roles)
        ):
            raise TestbedError(f"roster {path}: {name} needs a string class and a list of roles")
        service_port = attrs.get("port")
        if service_port is not None and not isinstance(service_port, int):
            raise TestbedError(f"roster {path}: {name}: port must be a number")
        user, sudo_password = attrs.get("user", "root"), attrs.get("sudoPassword", False)
        if user not in ("root", "deploy") or not isinstance(sudo_password, bool):
            raise TestbedError(
                f"roster {path}: {name}: user must be root or deploy, sudoPassword a boolean"
            )
        nix_size = attrs.get("nixSize")
        if nix_size is not None and not re.fullmatch(r"\d+[kmg]", str(nix_size)):
            raise TestbedError(f"roster {path}: {name}: nixSize must be like 64m")
        systemd, nix = _nix_of(f"roster {path}: {name}", klass, attrs)
        machines.append(
            Machine(
                name,
                base_port + 1 + index,
                klass,
                tuple(roles),
                service_port,
                user,
                sudo_password,
                nix_size,
                systemd,
                nix,
            )
        )
    return machines


def _nix_of(where: str, klass: str, attrs: dict[str, object]) -> tuple[bool, str]:
    """``(systemd, nix)`` of a roster entry: ``"nix": "sid"`` makes a systemd machine, and
    ``"systemd": true`` alone one on trixie's Nix."""
    systemd, nix = attrs.get("systemd"), attrs.get("nix")
    if systemd is not None and not isinstance(systemd, bool):
        raise TestbedError(f"{where}: systemd must be a boolean")
    if nix is not None and nix not in NIX_VERSIONS:
        raise TestbedError(f"{where}: nix must be one of {', '.join(NIX_VERSIONS)}, not {nix!r}")
    if nix is None:
        nix = "trixie" if systemd else HOST_NIX
    if systemd is None:
        systemd = nix != HOST_NIX
    if systemd and nix == HOST_NIX:
        raise TestbedError(
            f"{where}: a systemd machine runs its root's Nix (trixie or sid), not {HOST_NIX}"
        )
    if not systemd and nix != HOST_NIX:
        raise TestbedError(f"{where}: Nix {nix} runs only on a systemd machine (systemd: true)")
    _check_systemd(where, klass, systemd)
    return systemd, nix


def _check_systemd(where: str, klass: str, systemd: bool) -> None:
    if systemd and klass == "darwin":
        raise TestbedError(f"{where}: a darwin machine cannot run systemd (macOS has none)")


def with_systemd(machines: list[Machine], names: list[str]) -> list[Machine]:
    """The machines, those named in ``names`` made systemd machines (``up --systemd``).

    Example: ``with_systemd(load_roster(roster, 22400), ["db1"])``.
    """
    known = {machine.name for machine in machines}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise TestbedError(
            f"--systemd: no machine {', '.join(unknown)} among {', '.join(sorted(known))}"
        )
    for machine in machines:
        if machine.name in names:
            _check_systemd(f"--systemd {machine.name}", machine.klass, True)
    return [
        replace(m, systemd=True, nix="trixie" if m.nix == HOST_NIX else m.nix)
        if m.name in names
        else m
        for m in machines
    ]


# The example flake has configurations for this many machines (example/lib/roster.nix).
MAX_MACHINES = 60


def select(machines: list[Machine], count: int | None, light: bool = False) -> list[Machine]:
    """The first ``count`` machines (all when ``count`` is None); beyond the roster, its
    machines repeated in order, as the example flake repeats them (example/lib/roster.nix).

    Round ``r``'s copy of web1 is ``web<r*S+j+1>``, S the roster's machines named web<digits>
    and j web1's place among them in name order: web1 web2 give web3 web4, db1 gives db2.
    A copy has its original's settings and the next port; with ``light`` it is a namespace
    machine on this computer's Nix, whatever its original is (cheaper: see the README).
    Example: ``[m.name for m in select(load_roster(roster, 22400), 9)][7:] == ["web3", "web4"]``.
    """
    if count is None:
        return machines
    if not 1 <= count <= max(len(machines), MAX_MACHINES):
        raise TestbedError(
            f"--machines must be between 1 and {max(len(machines), MAX_MACHINES)}, not {count}"
        )
    names = [machine.name for machine in machines]
    fleet = machines[:count]
    for index in range(len(machines), count):
        original = machines[index % len(machines)]
        stem = _stem(original.name)
        same = sorted(name for name in names if _stem(name) == stem)
        number = index // len(machines) * len(same) + same.index(original.name) + 1
        copy = replace(original, name=f"{stem}{number}", port=machines[0].port + index)
        if light:
            copy = replace(copy, systemd=False, nix=HOST_NIX)
        fleet.append(copy)
    taken = [machine.name for machine in fleet]
    twice = sorted({name for name in taken if taken.count(name) > 1})
    if twice:
        raise TestbedError(f"repeating the roster names two machines {', '.join(twice)}")
    return fleet


def _stem(name: str) -> str:
    """A machine's name without its number: ``web`` for web12 (a name of digits only stays)."""
    return name.rstrip("0123456789") or name


def save_record(path: Path, machines: list[Machine]) -> None:
    """Remember which machines the fleet has (``status``, ``reboot`` and ``down`` read it)."""
    entries = [asdict(machine) for machine in machines]
    path.write_text(json.dumps(entries, indent=2) + "\n")


def load_record(path: Path) -> list[Machine]:
    """The machines remembered by the last ``up`` (none if it never ran)."""
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    return [
        Machine(
            entry["name"],
            entry["port"],
            entry["klass"],
            tuple(entry["roles"]),
            entry.get("service_port"),
            entry.get("user", "root"),
            entry.get("sudo_password", False),
            entry.get("nix_size"),
            entry.get("systemd", False),
            entry.get("nix", HOST_NIX),
            entry.get("latency_ms"),
        )
        for entry in entries
    ]
