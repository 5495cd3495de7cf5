"""The machines' processes as seen from outside: find, recognise, signal and wait for them.

A machine is two processes out here: the ``unshare`` PID recorded in ``machines/<name>/pid``,
and its child, PID 1 of the machine's namespace (``testbed.machine``). A systemd machine is its
launcher (``testbed.nspawn``, the recorded PID), systemd-nspawn, and the machine's systemd and
its processes, all in the machine's own cgroup directory. Only PIDs whose command line still
names this machine and state directory are ever signalled, and only cgroup directories named
after them are emptied.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from testbed.layout import REPO_ROOT

MACHINE_MODULE = "testbed.machine"
LAUNCHER_MODULE = "testbed.nspawn"  # a systemd machine's launcher
RELAY_MODULE = "testbed.relay"  # the relay in front of a machine's sshd (up --latency)
MACHINE_MODULES = (MACHINE_MODULE, LAUNCHER_MODULE, RELAY_MODULE)


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
    """Does ``pid`` still look like this machine (its ``unshare``, its PID 1, launcher or
    relay)?"""
    argv = command_line(pid)
    module = next((module for module in MACHINE_MODULES if module in argv), None)
    if module is None:
        return False
    position = argv.index(module)
    return argv[position + 1 : position + 3] == [name, str(state)]


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split()]


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
    for child in children(unshare_pid):
        if is_machine_process(child, name, state):
            return child
    return None


def systemd_init(launcher_pid: int, name: str, state: Path) -> int | None:
    """A systemd machine's PID 1 (its systemd), as seen from outside: the child of the
    launcher's systemd-nspawn, when that nspawn runs this machine's root."""
    rootfs = f"--directory={state}/machines/{name}/rootfs"
    for nspawn in children(launcher_pid):
        if rootfs in command_line(nspawn):
            return next(iter(children(nspawn)), None)
    return None


def cgroup_pids(directory: Path) -> list[int]:
    """Every process in a cgroup directory and below it."""
    pids = []
    for procs in directory.rglob("cgroup.procs") if directory.is_dir() else []:
        try:
            pids += [int(pid) for pid in procs.read_text().split()]
        except OSError:  # removed meanwhile
            continue
    return pids


def kill_cgroup(directory: Path) -> None:
    """SIGKILL every process in a cgroup directory and below it (a systemd machine that did
    not halt; its launcher may be gone already)."""
    kill_file = directory / "cgroup.kill"  # cgroup2: the kernel kills the whole subtree
    if kill_file.exists():
        with contextlib.suppress(OSError):
            kill_file.write_text("1\n")
    for pid in cgroup_pids(directory):
        signal_if_alive(pid, signal.SIGKILL)


def remove_cgroup_tree(directory: Path) -> None:
    """Remove an emptied cgroup directory, the ones the machine's systemd left in it first,
    then its parents up to ``flakefleet-testbed`` as far as they are empty."""
    if not directory.is_dir():
        return
    subdirectories = [path for path in directory.rglob("*") if path.is_dir()]
    for path in sorted(subdirectories, key=lambda path: len(path.parts), reverse=True):
        with contextlib.suppress(OSError):
            path.rmdir()
    with contextlib.suppress(OSError):
        directory.rmdir()
        for parent in directory.parents:
            if "flakefleet-testbed" not in parent.parts:
                break
            parent.rmdir()  # another machine's or fleet's is still there: stop (OSError)


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


def run_cli(
    args: list[str], env: Mapping[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`python -m testbed ARGS` as a process of its own, as a user runs it (tests, bench)."""

    return subprocess.run(
        [sys.executable, "-m", "testbed", *args],
        cwd=REPO_ROOT, env=dict(env), capture_output=True, text=True, check=False,
        timeout=timeout,
    )  # fmt: skip
