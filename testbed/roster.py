"""The machines of the test fleet: read from the roster, remembered in the state directory.

The roster is the example fleet's ``hosts.json``: ``{"web1": {"class": "nixos", "roles": ["web"],
...}, ...}``. Key order is machine order; machine ``i`` gets port ``base + 1 + i``. The testbed
reads ``class``, ``roles``, ``port``, ``user``, ``sudoPassword``, ``nixSize`` and ``systemd``
(a systemd machine, see ``testbed.nspawn``).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from testbed.layout import TestbedError

# Names become hostnames, directory names and ssh_config host aliases.
_MACHINE_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


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
    systemd: bool = False  # systemd as PID 1 in a Debian trixie root (testbed.nspawn), Nix 2.26

    @property
    def address(self) -> str:
        """The machine's own loopback address, which its name resolves to inside it.

        Services bind to it, so two test fleets (distinct ssh ports) never collide on a port.
        """
        return f"127.{(self.port >> 8) & 255}.{self.port & 255}.1"


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
        systemd = attrs.get("systemd", False)
        if not isinstance(systemd, bool):
            raise TestbedError(f"roster {path}: {name}: systemd must be a boolean")
        _check_systemd(f"roster {path}: {name}", klass, systemd)
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
            )
        )
    return machines


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
    return [replace(m, systemd=True) if m.name in names else m for m in machines]


def select(machines: list[Machine], count: int | None) -> list[Machine]:
    """The first ``count`` machines (all when ``count`` is None)."""
    if count is None:
        return machines
    if not 1 <= count <= len(machines):
        raise TestbedError(f"--machines must be between 1 and {len(machines)}, not {count}")
    return machines[:count]


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
        )
        for entry in entries
    ]
