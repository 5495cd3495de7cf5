"""The machines' processes as seen from outside: find, recognise, signal and wait for them.

A machine is two processes out here: the ``unshare`` PID recorded in ``machines/<name>/pid``,
and its child, PID 1 of the machine's namespace (``testbed.machine``). Only PIDs whose command
line still names this machine and state directory are ever signalled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

MACHINE_MODULE = "testbed.machine"


def command_line(pid: int) -> list[str]:
    """The argv of ``pid`` (empty if it is gone or a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode(errors="replace").split("\0")[:-1]


def is_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie.

    A machine that outlived the ``up`` that started it is re-parented to this computer's PID 1;
    if that init never reaps orphans, the exited ``unshare`` stays a zombie, which is not alive.
    """
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our own child
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def is_machine_process(pid: int, name: str, state: Path) -> bool:
    """Does ``pid`` still look like this machine (its ``unshare`` or its PID 1)?"""
    argv = command_line(pid)
    if MACHINE_MODULE not in argv:
        return False
    position = argv.index(MACHINE_MODULE)
    return argv[position + 1 : position + 3] == [name, str(state)]


def read_pid(pid_file: Path) -> int | None:
    try:
        text = pid_file.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def running_pid(pid_file: Path, name: str, state: Path) -> int | None:
    """The recorded ``unshare`` PID if that machine is running, else None."""
    pid = read_pid(pid_file)
    if pid is not None and is_alive(pid) and is_machine_process(pid, name, state):
        return pid
    return None


def namespace_init(unshare_pid: int, name: str, state: Path) -> int | None:
    """PID 1 of the machine's namespace, as seen from outside (the child of ``unshare``)."""
    try:
        children = Path(f"/proc/{unshare_pid}/task/{unshare_pid}/children").read_text().split()
    except OSError:
        return None
    for child in map(int, children):
        if is_machine_process(child, name, state):
            return child
    return None


def signal_if_alive(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait until every PID has exited; return those still alive after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    alive = [pid for pid in pids if is_alive(pid)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [pid for pid in alive if is_alive(pid)]
    return alive
