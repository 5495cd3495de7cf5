"""One deploy per machine at a time: a lock directory on the machine.

The lock is taken in the preflight round trip (`mkdir` is atomic) and names its holder:
the controller's host name, the deployer's PID and that process's start time. A second deploy
fails fast naming the holder. A holder on this controller whose process is gone (it was
killed) is recognised, as is one the user names in `break_lock` (a deployer on another
controller cannot be seen to die), and its lock is taken over with a compare-and-swap, so two
deployers racing for a stale lock cannot both win.
"""

from __future__ import annotations

import os
import shlex
import socket
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: `controller:pid:start-ticks:epoch-seconds`."""

    controller: str
    pid: int
    started: str
    since: int

    def __str__(self) -> str:
        return f"{self.controller}:{self.pid}:{self.started}:{self.since}"

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        parts = text.strip().split(":")
        if len(parts) != 4 or not parts[1].isdigit() or not parts[3].isdigit():
            return None
        return cls(parts[0], int(parts[1]), parts[2], int(parts[3]))

    @property
    def name(self) -> str:
        """How a user names the holder (in `break_lock`): `controller:pid`."""
        return f"{self.controller}:{self.pid}"

    def describe(self) -> str:
        age = max(0, int(time.time()) - self.since)
        return f"deployer PID {self.pid} on {self.controller}, for {age}s"

    @classmethod
    def this_process(cls) -> Holder:
        """This deployer process, as a lock holder."""
        pid = os.getpid()
        return cls(socket.gethostname(), pid, _start_ticks(pid) or "?", int(time.time()))

    def is_dead(self) -> bool:
        """True only when the holder is known to be gone: a process of this controller that no
        longer exists (or whose PID now belongs to another process)."""
        if self.controller != socket.gethostname():
            return False
        return _start_ticks(self.pid) != self.started


def _start_ticks(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def acquire_command(directory: str, holder: Holder | str) -> str:
    """Take the lock, or print who holds it: `lock acquired` or `lock held <holder>`."""
    lock = f"{directory}/lock"
    return (
        f"mkdir -p {directory} && if mkdir {lock} 2>/dev/null; "
        f"then echo {shlex.quote(str(holder))} > {lock}/holder; echo 'lock acquired'; "
        f'else echo "lock held $(cat {lock}/holder 2>/dev/null)"; fi'
    )


def take_over_command(directory: str, stale: str, holder: Holder) -> str:
    """Replace a dead holder's lock with ours, only if it still names that holder."""
    lock = f"{directory}/lock"
    return (
        f'[ "$(cat {lock}/holder 2>/dev/null)" = {shlex.quote(stale)} ] '
        f"&& echo {shlex.quote(str(holder))} > {lock}/holder.new "
        f"&& mv {lock}/holder.new {lock}/holder && echo 'lock acquired'"
    )


def release_command(directory: str, holder: Holder) -> str:
    """Remove the lock if we hold it (never someone else's)."""
    lock = f"{directory}/lock"
    mine = shlex.quote(str(holder))
    return f'if [ "$(cat {lock}/holder 2>/dev/null)" = {mine} ]; then rm -rf {lock}; fi'
