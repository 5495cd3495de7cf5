"""Which machine answers for a name: its SSH host key and its machine id, as last deployed.

Strict host key checking already refuses a machine whose host key is not the one the user
trusts for that name. It cannot tell two machines apart that share a host key (clones of one
image with its keys baked in, each with its own machine id) or that share an address (the
fleet file refuses that, but DNS and NAT can do it too). So the controller remembers, per fleet
file and machine, the host key it reached and the machine id behind it
(``.flakefleet/identities/<fleet>.json``), and a machine that answers with the same host key
but another machine id is not touched: the preflight stops before taking the lock.

A new host key that SSH accepted means the user trusted it (a reinstalled machine, a
re-created test fleet): its machine id is then recorded afresh.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flakefleet.files import write_atomically
from flakefleet.fleet import fleet_state_name

IDENTITIES = ".flakefleet/identities"  # under the repository

# The machine id: systemd's (NixOS, any Linux), else the Mac's hardware UUID.
MACHINE_ID_COMMAND = (
    "cat /etc/machine-id 2>/dev/null || ioreg -rd1 -c IOPlatformExpertDevice 2>/dev/null "
    '| sed -n \'s/.*"IOPlatformUUID" = "\\(.*\\)".*/\\1/p\''
)


@dataclass(frozen=True)
class Seen:
    """A machine as the controller last deployed it."""

    host_key: str
    machine_id: str


def host_key(host: Any) -> str | None:
    """The host key of pyinfra's open SSH connection to the machine (`type base64`), which
    SSH checked against the known hosts; None for another kind of connection."""
    client = getattr(getattr(host, "connector", None), "client", None)
    transport = client.get_transport() if client is not None else None
    if transport is None:
        return None
    key = transport.get_remote_server_key()
    return f"{key.get_name()} {key.get_base64()}"


class Identities:
    """The identities recorded for one fleet file's machines."""

    def __init__(self, cwd: Path, fleet_file: Path) -> None:
        self.path = cwd / IDENTITIES / f"{fleet_state_name(fleet_file)}.json"
        self._lock = threading.Lock()
        self._seen: dict[str, Seen] | None = None

    def _load(self) -> dict[str, Seen]:
        if self._seen is None:
            try:
                data = json.loads(self.path.read_text())
                self._seen = {name: Seen(**value) for name, value in data.items()}
            except (OSError, ValueError, TypeError, AttributeError):
                self._seen = {}
        return self._seen

    def expected(self, name: str, key: str) -> str:
        """The machine id the machine must have: the one recorded with this host key, or ""
        (nothing recorded, or SSH accepted another host key since)."""
        with self._lock:
            seen = self._load().get(name)
        return seen.machine_id if seen is not None and seen.host_key == key else ""

    def remember(self, name: str, key: str, machine_id: str) -> None:
        with self._lock:
            seen = self._load()
            if seen.get(name) == Seen(key, machine_id):
                return
            seen[name] = Seen(key, machine_id)
            text = json.dumps({n: vars(s) for n, s in sorted(seen.items())}, indent=2)
            write_atomically(self.path, text + "\n")


def mismatch(name: str, found: str, expected: str, where: str) -> str:
    """Why a machine is not touched: it is not the machine deployed under that name."""
    return (
        f"another machine answers for {name}: machine id {found}, but {name} had {expected} "
        f"with the same host key when this controller last deployed it ({where}); "
        "nothing was touched. If this is the machine, reinstalled, run again with "
        f"--data accept_machine_id={found}"
    )
