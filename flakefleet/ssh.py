"""OpenSSH command lines for a machine, shared by rsync, Nix and the smoke checks.

pyinfra connects with paramiko from the same host data; these options make every other
connection to the machine use the same address, port, key and host-key policy.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from typing import Any


def ssh_options(data: Mapping[str, Any]) -> list[str]:
    """`ssh` options (no destination) for a machine's pyinfra host data."""
    options = ["-o", "BatchMode=yes"]
    if data.get("ssh_config_file"):
        options[:0] = ["-F", str(data.get("ssh_config_file"))]
    if data.get("ssh_port"):
        options += ["-p", str(data.get("ssh_port"))]
    if data.get("ssh_key"):
        options += ["-i", str(data.get("ssh_key")), "-o", "IdentitiesOnly=yes"]
    if data.get("ssh_known_hosts_file"):
        options += ["-o", f"UserKnownHostsFile={data.get('ssh_known_hosts_file')}"]
    policy = data.get("ssh_strict_host_key_checking")
    if policy:
        options += ["-o", f"StrictHostKeyChecking={policy}"]
    return options


def ssh_destination(data: Mapping[str, Any], name: str) -> str:
    """`user@address` for a machine; the address defaults to its name."""
    address = data.get("ssh_hostname") or name
    user = data.get("ssh_user")
    return f"{user}@{address}" if user else str(address)


def ssh_command(data: Mapping[str, Any]) -> str:
    """The `ssh ...` program line for `rsync -e` and `NIX_SSHOPTS`-style uses."""
    return shlex.join(["ssh", *ssh_options(data)])


def relay_options(data: Mapping[str, Any]) -> list[str]:
    """`ssh` options for another machine (a builder or cache) to reach this one.

    Only the port: keys and known hosts are that machine's own, as for Nix remote builders.
    """
    options = ["-o", "BatchMode=yes"]
    if data.get("ssh_port"):
        options += ["-p", str(data.get("ssh_port"))]
    return options
