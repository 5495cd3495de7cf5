"""One deploy per machine at a time: a lock directory on the machine.

The lock is taken only when a deploy has work on the machine: the preflight reads whether it is
free (a no-op redeploy costs that one round trip and never locks), and the first step that
changes the machine takes it (`mkdir` is atomic), but only if nobody took it since the
preflight: every deploy that takes the lock leaves its name in the state directory's `serial`,
which the preflight read. The lock names its holder: the controller's host name, the
deployer's PID and that process's start time. A second deploy fails fast naming the holder. A
holder on this controller whose process is gone (it was killed) is recognised, as is one the
user names in `break_lock` (a deployer on another controller cannot be seen to die), and its
lock is taken over with a compare-and-swap, so two deployers racing for a stale lock cannot
both win.
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

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        parts = text.strip().split(":")
        if len(parts) == 1 and parts[0].isdigit():  # no holder could be read: the lock's age
            return cls("", 0, "", int(time.time()) - int(parts[0]))
        if len(parts) != 4 or not parts[1].isdigit() or not parts[3].isdigit():
            return None
        return cls(parts[0], int(parts[1]), parts[2], int(parts[3]))

    @property
    def name(self) -> str:
        """How a user names the holder (in `break_lock`): `controller:pid`."""
        return f"{self.controller}:{self.pid}"

    @property
    def unknown(self) -> bool:
        """A lock whose holder could not be read (its writer died, or the disk was full)."""
        return not self.controller

    def __str__(self) -> str:
        if self.unknown:
            return ""
        return f"{self.controller}:{self.pid}:{self.started}:{self.since}"

    def describe(self) -> str:
        age = max(0, int(time.time()) - self.since)
        if self.unknown:
            return f"a holder that could not be read, for {age}s"
        return f"deployer PID {self.pid} on {self.controller}, for {age}s"

    @classmethod
    def this_process(cls) -> Holder:
        """This deployer process, as a lock holder."""
        pid = os.getpid()
        return cls(socket.gethostname(), pid, _start_ticks(pid) or "?", int(time.time()))

    def is_dead(self) -> bool:
        """True only when the holder is known to be gone: a process of this controller that no
        longer exists (or whose PID now belongs to another process), or a holder nobody could
        read for ORPHAN_SECONDS."""
        if self.unknown:
            return int(time.time()) - self.since >= ORPHAN_SECONDS
        if self.controller != socket.gethostname():
            return False
        return _start_ticks(self.pid) != self.started

    def is_alive_here(self) -> bool:
        """True when the holder is a deployer process on this controller that still runs."""
        return self.controller == socket.gethostname() and not self.is_dead()


def _start_ticks(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


# A lock without a readable holder (its writer died, or /run was full) is stale after this.
ORPHAN_SECONDS = 60


def state_dir_command(directory: str) -> str:
    """Make flakefleet's state directory on the machine, or print `lock failed: ...` when it
    is not safe: it must belong to the user the deploy runs as and be writable by nobody
    else (another user could otherwise plant a confirmation). `ls -ldn` reads the same on
    Linux and macOS. Made under umask 077: `mkdir -m` sets only the last directory's mode, and
    a user's umask may be 002 (Debian's pam_umask, for a user with a group of their own)."""
    quoted = shlex.quote(directory)
    return (
        f"(umask 077 && mkdir -p {quoted}/activation) 2>/dev/null; set -- $(ls -ldn {quoted}); "
        f'case "$1:$3" in d????-??-*:"$(id -u)") ;; *) '
        f"echo 'lock failed: {directory} must belong to '\"$(id -un)\"' and be writable by "
        "nobody else'; exit 0 ;; esac"
    )


def status_command(directory: str) -> str:
    """Whether the lock is free, without taking it: `lock free <serial>` (the name of the last
    deploy that took it, "" if none since boot) or `lock held <holder>`."""
    return (
        f"if [ -d {directory}/lock ]; then {_held(directory)}; "
        f'else echo "lock free $(cat {directory}/serial 2>/dev/null)"; fi'
    )


def _held(directory: str) -> str:
    """Prints `lock held <holder>`, or the lock's age in seconds when no holder can be read."""
    lock = f"{directory}/lock"
    return (
        f'h=$(cat {lock}/holder 2>/dev/null); if [ -n "$h" ]; then echo "lock held $h"; else '
        f"t=$(stat -c %Y {lock} 2>/dev/null || stat -f %m {lock}); "
        'echo "lock held  $(( $(date +%s) - t ))"; fi'
    )


def acquire_command(directory: str, holder: Holder | str, serial: str | None = None) -> str:
    """Take the lock, or say why not: `lock acquired`, `lock held <holder>` (see `_held`),
    `lock changed` (the serial is not `serial` any more: another deploy took the lock since the
    machine was read), or `lock failed: <reason>`.

    All or nothing: a lock whose holder or serial cannot be written (a full /run) is removed
    again.
    """
    lock = f"{directory}/lock"
    name = shlex.quote(str(holder))
    read = f'[ "$(cat {directory}/serial 2>/dev/null)" = {shlex.quote(serial or "")} ]'
    return (
        f"if mkdir {lock} 2>/dev/null; then "
        f"if ! {'true' if serial is None else read}; then rmdir {lock}; echo 'lock changed'; "
        f"elif {_write(name, f'{lock}/holder')} && {_write(name, f'{directory}/serial')}; then "
        "echo 'lock acquired'; "
        f"else rm -rf {lock}; echo 'lock failed: could not write {lock}/holder (is it full?)'; "
        f"fi; elif [ -d {lock} ]; then {_held(directory)}; "
        f"else echo 'lock failed: could not make {lock}'; fi"
    )


def _write(text: str, path: str) -> str:
    """Replace the file at `path` with the line `text` (shell-quoted), whole or not at all."""
    return f"printf '%s\\n' {text} > {path}.new 2>/dev/null && mv {path}.new {path}"


def take_over_command(directory: str, stale: str, holder: Holder) -> str:
    """Replace a dead holder's lock with ours, only if it still names that holder.

    Of deployers racing for the same stale lock, exactly one wins: `mkdir` of the takeover
    marker is the one atomic step, and the winner checks the holder again under it. A marker
    left by a deployer that died halfway is cleared after ORPHAN_SECONDS.
    """
    lock = f"{directory}/lock"
    marker = f"{lock}/takeover"
    name = shlex.quote(str(holder))
    old = ORPHAN_SECONDS // 60 or 1
    return (
        f"find {marker} -maxdepth 0 -mmin +{old} -exec rmdir {{}} + 2>/dev/null; "
        f"mkdir {marker} 2>/dev/null || {{ echo 'lock taken over by another deployer'; exit 1; }}; "
        f'if [ "$(cat {lock}/holder 2>/dev/null)" = {shlex.quote(stale)} ] '
        f"&& {_write(name, f'{lock}/holder')} && {_write(name, f'{directory}/serial')}; "
        f"then rmdir {marker}; echo 'lock acquired'; "
        f"else rmdir {marker}; echo 'lock taken over by another deployer'; exit 1; fi"
    )


def release_command(directory: str, holder: Holder) -> str:
    """Remove the lock if we hold it (never someone else's)."""
    lock = f"{directory}/lock"
    mine = shlex.quote(str(holder))
    return f'if [ "$(cat {lock}/holder 2>/dev/null)" = {mine} ]; then rm -rf {lock}; fi'
