"""The fleet file: which machines exist, how to reach them, and what they are.

A fleet file is YAML::

    ssh:                      # optional, for every machine; paths are relative to this file
      key: keys/id_ed25519
      known_hosts: known_hosts
    data:                     # optional pyinfra data for every machine
      goal: switch
    machines:
      - name: web1
        address: web1.example.org
        port: 22              # optional
        user: root            # optional
        class: nixos          # nixos | darwin | home
        roles: [web]
        data: {build_on: target}   # optional, this machine only

Everything is checked before any machine is contacted; the first problem is raised as a
`FleetError` whose message names the file, the machine and the field.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import yaml

MACHINE_CLASSES = ("nixos", "darwin", "home")
MACHINE_FIELDS = ("name", "address", "port", "user", "class", "roles", "data")
TOP_LEVEL_FIELDS = ("ssh", "data", "machines")
SSH_FIELDS = ("key", "known_hosts", "config")

# Machine names become pyinfra host names and flake attribute names; roles become group names
# and Python identifiers in group_data/<role>.py.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
ROLE_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# pyinfra's own privilege settings: flakefleet runs sudo itself (see flakefleet.sudo), and
# pyinfra's would put a sudo password in the machine's process list.
PYINFRA_PRIVILEGE_KEYS = frozenset(
    {"_sudo", "_sudo_user", "_sudo_password", "_use_sudo_login", "_preserve_sudo_env",
     "_su_user", "_su_password", "_doas", "_doas_user"}
)  # fmt: skip
# The host data key inventory.py sets to the repository's directory (see Fleet.host_data).
REPOSITORY_KEY = "flakefleet_repository"
# Roles may not shadow the groups pyinfra or flakefleet define themselves.
RESERVED_GROUPS = frozenset({"all", "inventory", *MACHINE_CLASSES})


class FleetError(ValueError):
    """A fleet file that cannot be used; the message is one line a user can act on."""

    def __init__(self, path: Path | str, message: str, machine: str | None = None) -> None:
        where = f"{path}: machine {machine!r}: " if machine else f"{path}: "
        super().__init__(where + message)


@dataclass(frozen=True)
class Machine:
    """One machine of the fleet, as the fleet file describes it."""

    name: str
    address: str
    machine_class: str = "nixos"
    port: int | None = None
    user: str = "root"
    roles: tuple[str, ...] = ()
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def groups(self) -> tuple[str, ...]:
        """The pyinfra groups this machine belongs to: its class, then its roles."""
        return (self.machine_class, *self.roles)


@dataclass(frozen=True)
class Fleet:
    path: Path
    machines: tuple[Machine, ...]
    ssh: dict[str, str] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)

    def machine(self, name: str) -> Machine | None:
        """The machine named `name`, if the fleet has it."""
        return next((machine for machine in self.machines if machine.name == name), None)

    def host_data(self, machine: Machine, repository: Path | None = None) -> dict[str, Any]:
        """pyinfra host data for a machine: how to reach it, then the fleet's and its own data.

        A relative `flake` here is relative to this file; `repository` (where inventory.py and
        group_data/ are) is what the relative paths of group data and `--data` are relative to.
        """
        ssh: dict[str, Any] = {"ssh_hostname": machine.address, "ssh_user": machine.user}
        if machine.port is not None:
            ssh["ssh_port"] = machine.port
        if "key" in self.ssh:
            ssh["ssh_key"] = self.ssh["key"]
        if "known_hosts" in self.ssh:
            # A fleet with its own known_hosts is checked strictly against it; otherwise the
            # user's ssh settings (and pyinfra's defaults) apply.
            ssh["ssh_known_hosts_file"] = self.ssh["known_hosts"]
            ssh["ssh_strict_host_key_checking"] = "yes"
        if "config" in self.ssh:
            ssh["ssh_config_file"] = self.ssh["config"]
        data = _merge(self.data, machine.data)
        if isinstance(data.get("flake"), str) and not Path(data["flake"]).is_absolute():
            data["flake"] = str((self.path.parent / data["flake"]).resolve())
        if repository is not None:
            data[REPOSITORY_KEY] = str(repository)
        return {
            **ssh,
            **data,
            "machine_class": machine.machine_class,
            "roles": list(machine.roles),
        }


def _merge(fleet: dict[str, Any], machine: dict[str, Any]) -> dict[str, Any]:
    """The fleet's data under a machine's own: mappings (e.g. `sources`, `nix_options`) are
    merged one level deep, so a machine adds to the fleet's entries instead of replacing them."""
    merged = dict(fleet)
    for key, value in machine.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


class _StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """A YAML loader that refuses duplicate keys instead of keeping the last one silently.
    Parsed by libyaml where PyYAML has it: every run reads the fleet file several times
    (inventory, deploy, checks), 5 times faster than the pure-Python parser."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node)
        if key in mapping:
            line = key_node.start_mark.line + 1
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (line {line})"
            )
        mapping[key] = loader.construct_object(value_node, deep=True)
    return mapping


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_fleet(path: Path | str) -> Fleet:
    """Read and check a fleet file. Raises FleetError naming the file, machine and field."""
    path = Path(path)
    try:
        document = yaml.load(path.read_text(), Loader=_StrictLoader)
    except OSError as error:
        raise FleetError(path, f"cannot read the fleet file ({error.strerror})") from error
    except yaml.YAMLError as error:
        raise FleetError(path, f"not valid YAML: {_yaml_problem(error)}") from error
    return parse_fleet(document, path)


def parse_fleet(document: Any, path: Path) -> Fleet:
    """Check a parsed fleet document; relative ssh paths are resolved against the file."""
    if not isinstance(document, dict):
        raise FleetError(path, "expected a mapping with a 'machines' list")
    _reject_unknown(path, None, document, TOP_LEVEL_FIELDS, "top-level field")

    ssh = document.get("ssh") or {}
    if not isinstance(ssh, dict):
        raise FleetError(path, "field 'ssh': expected a mapping")
    _reject_unknown(path, None, ssh, SSH_FIELDS, "field in 'ssh'")
    for key, value in ssh.items():
        if not isinstance(value, str) or not value:
            raise FleetError(path, f"field 'ssh.{key}': expected a path")
    resolved_ssh = {key: str((path.parent / value).resolve()) for key, value in ssh.items()}

    data = document.get("data") or {}
    if not isinstance(data, dict):
        raise FleetError(path, "field 'data': expected a mapping")
    _check_data(path, None, data)

    entries = document.get("machines")
    if not isinstance(entries, list) or not entries:
        raise FleetError(path, "field 'machines': expected a non-empty list of machines")

    machines: list[Machine] = []
    seen: set[str] = set()
    reached: dict[tuple[str, int | None, str], str] = {}  # where each machine is logged into
    for index, entry in enumerate(entries, start=1):
        machine = _parse_machine(path, index, entry)
        if machine.name in seen:
            raise FleetError(path, "field 'name': duplicate machine name", machine.name)
        seen.add(machine.name)
        # Two entries reaching the same login would deploy one machine's system on the other.
        where = (machine.address.lower(), machine.port, machine.user)
        if where in reached:
            port = f":{machine.port}" if machine.port else ""
            raise FleetError(
                path,
                f"fields 'address', 'port', 'user': {machine.user}@{machine.address}{port} is "
                f"machine {reached[where]!r} already",
                machine.name,
            )
        reached[where] = machine.name
        machines.append(machine)
    # Last, so that a mistake in the file itself is named before a file it names is missed.
    for key, value in resolved_ssh.items():
        if not Path(value).is_file():
            raise FleetError(path, f"field 'ssh.{key}': {value} is not a file")
    return Fleet(path=path, machines=tuple(machines), ssh=resolved_ssh, data=data)


def _parse_machine(path: Path, index: int, entry: Any) -> Machine:
    if not isinstance(entry, dict):
        raise FleetError(path, f"machine #{index}: expected a mapping")
    name = entry.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        label = f"#{index}" if name is None else repr(name)
        raise FleetError(
            path,
            f"machine {label}: field 'name': expected a name of letters, digits, '.', '_' or '-'",
        )
    _reject_unknown(path, name, entry, MACHINE_FIELDS, "field")

    address = entry.get("address")
    if not isinstance(address, str) or not address.strip():
        raise FleetError(path, "field 'address': missing (a host name or IP address)", name)

    port = entry.get("port")
    if port is not None and (
        not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536
    ):
        raise FleetError(path, f"field 'port': {port!r} is not a port number", name)

    user = entry.get("user", "root")
    if not isinstance(user, str) or not user:
        raise FleetError(path, "field 'user': expected a user name", name)

    machine_class = entry.get("class", "nixos")
    if machine_class not in MACHINE_CLASSES:
        raise FleetError(
            path,
            f"field 'class': {machine_class!r} is not one of {', '.join(MACHINE_CLASSES)}",
            name,
        )

    roles = entry.get("roles", [])
    if not isinstance(roles, list):
        raise FleetError(path, "field 'roles': expected a list of role names", name)
    for role in roles:
        if not isinstance(role, str) or not ROLE_PATTERN.match(role):
            raise FleetError(
                path,
                f"field 'roles': {role!r} is not a valid role name (a Python identifier)",
                name,
            )
        if role in RESERVED_GROUPS:
            raise FleetError(path, f"field 'roles': {role!r} is a reserved group name", name)

    data = entry.get("data", {})
    if not isinstance(data, dict):
        raise FleetError(path, "field 'data': expected a mapping", name)
    _check_data(path, name, data)

    return Machine(
        name=name,
        address=address,
        machine_class=machine_class,
        port=port,
        user=user,
        roles=tuple(dict.fromkeys(roles)),
        data=data,
    )


def _yaml_problem(error: yaml.YAMLError) -> str:
    """What is wrong, and where: `line 3, column 5: mapping values are not allowed here`."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    if mark is None:
        return str(problem)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def _check_data(path: Path, machine: str | None, data: dict[str, Any]) -> None:
    """The data settings that must stop a deploy before it starts."""
    for key in data:
        if key in PYINFRA_PRIVILEGE_KEYS:
            raise FleetError(
                path,
                f"field 'data.{key}': remove it: flakefleet runs sudo itself for a machine "
                "whose user is not root (see sudo_password_command)",
                machine,
            )
    if "sudo_password" in data:
        raise FleetError(
            path,
            "field 'data.sudo_password': a password in the fleet file is a secret in plain "
            "text; use sudo_password_command (a command that prints it) or let it be asked",
            machine,
        )
    command = data.get("sudo_password_command")
    if command is not None and (not isinstance(command, str) or not command.strip()):
        raise FleetError(
            path, "field 'data.sudo_password_command': expected a shell command", machine
        )


def _reject_unknown(
    path: Path, machine: str | None, mapping: dict[str, Any], known: tuple[str, ...], what: str
) -> None:
    for key in mapping:
        if key not in known:
            raise FleetError(
                path, f"unknown {what} {key!r} (expected one of: {', '.join(known)})", machine
            )


def fleet_file() -> Path:
    """The fleet file of this run: $FLAKEFLEET_FLEET, else `fleet.yaml` in the working
    directory (where `pyinfra inventory.py ...` runs)."""
    return Path(os.environ.get("FLAKEFLEET_FLEET") or "fleet.yaml")


def limits(argv: Sequence[str]) -> list[str]:
    """The `--limit` patterns of a pyinfra command line (`--limit X` or `--limit=X`)."""
    found = []
    for index, argument in enumerate(argv):
        if argument == "--limit" and index + 1 < len(argv):
            found.append(argv[index + 1])
        elif argument.startswith("--limit="):
            found.append(argument.removeprefix("--limit="))
    return found


def limit_problems(fleet: Fleet, patterns: Sequence[str]) -> list[str]:
    """Each `--limit` pattern that selects no machine, a line each (pyinfra only warns, and
    deploys the rest, or nothing at all with exit status 0).

    Example: ``limit_problems(fleet, ["web1,web2"])`` names the pattern and says to repeat
    `--limit`, as pyinfra does not split on commas.
    """
    groups = {"all", *(group for machine in fleet.machines for group in machine.groups)}
    names = [machine.name for machine in fleet.machines]
    problems = []
    for pattern in patterns:
        if pattern in groups or any(fnmatch(name, pattern) for name in names):
            continue
        problem = f"--limit {pattern!r} matches no machine, role or class of {fleet.path}"
        parts = [part.strip() for part in pattern.split(",") if part.strip()]
        if len(parts) > 1:
            problem += "; pyinfra does not split on commas: " + " ".join(
                f"--limit {part}" for part in parts
            )
        problems.append(problem)
    return problems


def fleet_state_name(fleet: Path) -> str:
    """The name of a fleet file's own state on the controller (its GC roots, its machines'
    identities): its stem and a digest of its path, as two fleets may both have a `web1`
    (`fleet-1a2b3c4d`)."""
    resolved = fleet.resolve()
    return f"{resolved.stem}-{hashlib.sha256(str(resolved).encode()).hexdigest()[:8]}"
