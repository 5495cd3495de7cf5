"""The launcher of one systemd test machine: its root, its cgroup and systemd-nspawn.

Started by ``testbed.fleet`` as ``unshare --mount --propagation private python -m
testbed.nspawn <name> <state dir>`` (unshare execs it: the recorded PID is this process).
In order, it

1. refuses to run unless its mount propagation is private, so that no mount it makes ever
   shows in this computer's own mount table;
2. moves itself into the machine's own cgroup directory in each hierarchy
   (``flakefleet-testbed/<state digest>/<name>``): with ``--keep-unit`` nspawn puts the machine
   in ``<its cgroup>/payload``, so two launchers must never share one;
3. mounts the machine's root, an overlay of its upper layer on the template (the directory
   named in ``template``), a fresh tmpfs on ``/run`` (nspawn's scratch files stay out of this
   computer's ``/run``) and, for a small ``/nix`` (``nix-size``), a tmpfs of that size on the
   machine's store directory (it lasts across reboots and is emptied when the machine stops,
   as on a namespace machine), then checks them;
4. runs ``systemd-nspawn --boot`` with systemd as the machine's PID 1, its own ``/nix`` and an
   empty ``/root``, and runs it again each time it exits 133 (``systemctl reboot`` inside: the
   machine gets a new boot id); SIGTERM is passed on to nspawn, which halts the machine
   cleanly, and ends the loop (nspawn also gets SIGTERM if the launcher itself is killed);
5. leaves the machine's cgroup directories and removes them.

The machine's files (hostname, machine id, host key, sshd and Nix settings) are written from
outside, into its upper layer, before it starts (``testbed.files``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

# Standard library and testbed's own stdlib-only modules only: this runs on the system Python.
from testbed.layout import MachinePaths, StatePaths, cgroup_hierarchies
from testbed.machine import (
    MS_NODEV,
    MS_NOSUID,
    MachineError,
    check_private_propagation,
    mount,
    read_mountinfo,
)
from testbed.processes import remove_cgroup_tree

ENVIRONMENT = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    # Pure cgroup2 inside, as on a real server, even on a hybrid computer.
    "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1",
}
NSPAWN = "/usr/bin/systemd-nspawn"
PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
EXIT_REBOOT = 133  # nspawn's exit code when the machine rebooted itself


def log(message: str) -> None:
    print(f"launcher: {message}", file=sys.stderr, flush=True)


# -- cgroups -----------------------------------------------------------------------------------


def own_cgroups() -> dict[Path, str]:
    """This process's cgroup in each hierarchy the machine needs: ``{hierarchy: path}``."""
    lines = [line.split(":", 2) for line in Path("/proc/self/cgroup").read_text().splitlines()]
    v2 = next((path for number, _, path in lines if number == "0"), "/")
    named = next((path for _, names, path in lines if names == "name=systemd"), "/")
    return {h: named if h.name == "systemd" else v2 for h in cgroup_hierarchies()}


def enter_cgroup(directory: Path) -> None:
    """Move this process into ``directory``, made first (another launcher may be removing
    an emptied parent at the same moment: then make it again)."""
    for _ in range(20):
        directory.mkdir(parents=True, exist_ok=True)
        try:
            (directory / "cgroup.procs").write_text(f"{os.getpid()}\n")
            return
        except FileNotFoundError:
            continue
    raise MachineError(f"could not enter cgroup {directory}")


# -- the machine -------------------------------------------------------------------------------


def mount_root(machine: MachinePaths, template: str) -> None:
    """The machine's root (overlay on the template), a private /run and a small /nix if it
    has one; then verify them."""
    options = f"lowerdir={template},upperdir={machine.rootfs_upper},workdir={machine.rootfs_work}"
    mount("overlay", str(machine.rootfs), "overlay", 0, options)
    mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=755")
    tmpfs = ["/run"]
    if machine.nix_size.exists():
        size = machine.nix_size.read_text().strip()
        mount("tmpfs", str(machine.nix), "tmpfs", MS_NOSUID | MS_NODEV, f"size={size},mode=755")
        tmpfs.append(str(machine.nix))
    mounts = read_mountinfo()
    fstype, super_options = mounts.get(str(machine.rootfs), ("", []))
    if fstype != "overlay" or f"upperdir={machine.rootfs_upper}" not in super_options:
        raise MachineError(f"{machine.rootfs} is not the machine's overlay ({fstype})")
    for target in tmpfs:
        if mounts.get(target, ("",))[0] != "tmpfs":
            raise MachineError(f"{target} is not a fresh tmpfs")


def nspawn_command(name: str, machine: MachinePaths) -> list[str]:
    return [
        NSPAWN,
        "--quiet",
        f"--directory={machine.rootfs}",
        f"--machine={name}",
        "--boot",
        # No machined and no D-Bus on this computer: nspawn stays in the cgroup it was given.
        "--register=no",
        "--keep-unit",
        "--console=read-only",  # the machine's console goes to console.log
        "--link-journal=no",  # never touch this computer's /var/log/journal
        f"--bind={machine.nix}:/nix",
        f"--bind={machine.home}:/root",
    ]


def halt_with(launcher: int) -> None:
    """In nspawn before it starts: SIGTERM (a clean halt) when the launcher dies, so a killed
    launcher leaves no machine running without it."""
    if _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0 or os.getppid() != launcher:
        os._exit(1)  # no such promise, or the launcher is already gone


class Launcher:
    """Runs nspawn until the machine halts or SIGTERM; restarts it when it reboots."""

    def __init__(self, command: list[str]) -> None:
        self.command = command
        self.child: int | None = None  # a pidfd: never signals a reaped (reused) PID
        self.stopping = False

    def on_stop(self, signum: int, _frame: object) -> None:
        self.stopping = True
        self.halt()

    def halt(self) -> None:
        """nspawn passes SIGTERM on to the machine's systemd as SIGRTMIN+3: a clean halt."""
        if self.child is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.child, signal.SIGTERM)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.on_stop)
        signal.signal(signal.SIGINT, self.on_stop)
        launcher = os.getpid()
        while True:
            nspawn = subprocess.Popen(  # preexec_fn is safe: the launcher has one thread
                self.command,
                env=ENVIRONMENT,
                stdin=subprocess.DEVNULL,
                preexec_fn=lambda: halt_with(launcher),
            )
            self.child = os.pidfd_open(nspawn.pid)
            if self.stopping:  # SIGTERM came while nspawn was being started
                self.halt()
            code = nspawn.wait()
            fd, self.child = self.child, None
            os.close(fd)
            if code == EXIT_REBOOT and not self.stopping:
                log("the machine rebooted; starting it again")
                continue
            log(f"systemd-nspawn exited {code}")
            return code


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m testbed.nspawn <name> <state dir>", file=sys.stderr)
        return 1
    name, state_root = argv
    state = StatePaths(Path(state_root))
    machine = state.machine(name)
    try:
        check_private_propagation()  # 1.
        template = machine.template.read_text().strip()
        cgroups = own_cgroups()
        if not cgroups:
            raise MachineError("no cgroup2 hierarchy is mounted")
    except (MachineError, OSError) as error:
        print(f"testbed.nspawn: refusing to boot {name}: {error}", file=sys.stderr)
        return 1
    entered: list[Path] = []
    try:
        for hierarchy in cgroups:  # 2.
            entered.append(hierarchy / state.cgroup(name))
            enter_cgroup(entered[-1])
        mount_root(machine, template)  # 3.
        log(f"booting {name} from {template}")
        return Launcher(nspawn_command(name, machine)).run()  # 4.
    except (MachineError, OSError) as error:
        print(f"testbed.nspawn: refusing to boot {name}: {error}", file=sys.stderr)
        return 1
    finally:
        for hierarchy, original in cgroups.items():  # 5. back where it came from, then tidy up
            try:
                (hierarchy / original.lstrip("/") / "cgroup.procs").write_text(f"{os.getpid()}\n")
            except OSError:
                (hierarchy / "cgroup.procs").write_text(f"{os.getpid()}\n")
        for directory in entered:
            remove_cgroup_tree(directory)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
