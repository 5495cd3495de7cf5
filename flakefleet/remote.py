"""Commands on a machine over a new OpenSSH connection.

pyinfra's own connection is one long-lived session; some steps need a connection of their own:
waiting for a detached activation after the first connection dropped, and confirming an
activation, which must prove that a *new* login still works.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Mapping
from typing import Any

from flakefleet import sudo
from flakefleet.process import run
from flakefleet.ssh import ssh_destination, ssh_options

# Notice a dead peer within ~15 s instead of waiting on TCP for minutes.
KEEPALIVE = [
    "-o",
    "ServerAliveInterval=5",
    "-o",
    "ServerAliveCountMax=3",
    "-o",
    "ConnectTimeout=10",
]


class Unreachable(RuntimeError):
    """No SSH connection could be made, or it broke before the command finished."""


def run_on(
    data: Mapping[str, Any],
    name: str,
    command: str,
    *,
    stdin: str | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a shell command on a machine as root (through sudo when its SSH user is not root;
    a home-manager machine's as its user), with `stdin` on its standard input.

    Raises Unreachable when ssh itself fails (exit 255) or the timeout passes.
    """
    privileged = sudo.as_root(data, command, stdin)
    argv = ["ssh", *ssh_options(data), *KEEPALIVE, ssh_destination(data, name), privileged.command]
    text = privileged.stdin.text if privileged.stdin else None
    try:
        completed = run(argv, stdin=text, check=False, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        raise Unreachable(f"no answer from {name} within {timeout:.0f}s") from error
    if completed.returncode == 255:
        detail = completed.stderr.strip().splitlines()[-1:] or ["connection failed"]
        raise Unreachable(f"ssh to {name} failed: {detail[0]}")
    return completed


def state_dir(data: Mapping[str, Any]) -> str:
    """Where flakefleet keeps its runtime files on a machine (locks, activations).

    Under /run, so a reboot clears them; a home-manager machine is deployed without root, so
    its user's files live in /tmp.
    """
    if data.get("machine_class") == "home":
        return f"/tmp/flakefleet-{data.get('ssh_user') or 'user'}"
    return "/run/flakefleet"


def reconnect(host: Any, reason: str) -> bool:
    """Give pyinfra a new connection to a machine after its old one was cut (a reboot, a
    dropped network), so the run's later steps still reach it. Returns whether it worked."""
    with contextlib.suppress(Exception):
        host.disconnect()
    host.connected = False
    try:
        host.connect(reason=reason, raise_exceptions=True)
    except Exception:  # pyinfra raises ConnectError, paramiko its own errors
        return False
    return True
