"""The test fleet's life cycle: up, down, status and reboot.

``up`` prepares each stopped machine's files, starts all of them at once and waits until each
sshd accepts a login (and a systemd machine has finished booting). ``down`` signals each
machine's PID 1 (a systemd machine's launcher) and waits until its recorded processes are gone
(a systemd machine's cgroup too). A machine is running when its recorded ``unshare`` PID is
alive and still names this machine and state directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from testbed import files, processes, template
from testbed.layout import (
    BOOT_ID_FILE,
    OUTER_PID_ENV,
    REPO_ROOT,
    StatePaths,
    TestbedError,
    base_port,
    cgroup_hierarchies,
    state_dir,
)
from testbed.roster import Machine, load_record, load_roster, save_record, select, with_systemd

MACHINE_ENVIRONMENT = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "PYTHONPATH": str(REPO_ROOT),
    "LANG": "C.UTF-8",
    "HOME": "/root",
}
NAMESPACES = ["--mount", "--uts", "--ipc", "--pid", "--fork", "--kill-child", "--mount-proc"]
# Inside a machine only what lives under /usr stays visible after the mounts (a venv under
# /root or /tmp disappears), so PID 1 runs on the system Python when there is one.
MACHINE_PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
READY_TIMEOUT = 30.0
SYSTEMD_READY_TIMEOUT = 90.0  # a whole boot, several machines at once on two cores
STOP_TIMEOUT = 10.0
SYSTEMD_STOP_TIMEOUT = 30.0  # a clean halt: every unit stopped
KILL_TIMEOUT = 5.0
# A systemd machine is up once its boot has finished, failed units or not.
SYSTEMD_READY = "systemctl is-system-running --wait"
SYSTEMD_BOOTED = ("running", "degraded")
KERNEL_BOOT_ID = "/proc/sys/kernel/random/boot_id"


@dataclass(frozen=True)
class MachineStatus:
    machine: Machine
    running: bool
    system: str | None  # /run/current-system inside the machine


def _state() -> StatePaths:
    return StatePaths(state_dir())


@contextlib.contextmanager
def _locked(state: StatePaths) -> Iterator[None]:
    """One life-cycle command at a time per state directory."""
    state.root.mkdir(parents=True, exist_ok=True)
    with open(state.root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# -- up ----------------------------------------------------------------------------------------


def up(
    roster: Path,
    count: int | None = None,
    systemd: Sequence[str] = (),
    light: bool = False,
    latency_ms: float | None = None,
) -> list[Machine]:
    """Start the first ``count`` roster machines (all by default; more repeat the roster, see
    ``roster.select``); return those started.

    Those named in ``systemd`` are systemd machines, whatever the roster says; with ``light``
    the roster's copies are namespace machines. With ``latency_ms`` each machine is reached
    through a relay adding that round trip (``testbed.relay``). Machines already running stay
    as they are. Example: ``up(Path("example/hosts.json"), 30, latency_ms=50)``.
    """
    state = _state()
    wanted = with_systemd(select(load_roster(roster, base_port()), count, light), list(systemd))
    if latency_ms is not None:
        wanted = [replace(machine, latency_ms=latency_ms) for machine in wanted]
    with _locked(state):
        for directory in (state.keys, state.machines, state.tmp):
            directory.mkdir(parents=True, exist_ok=True)
        state.marker.touch()
        files.generate_key(state.client_key, "flakefleet-testbed")
        files.generate_key(state.machine_key, "flakefleet-testbed-machines")
        files.generate_signing_key(state.signing_key, f"testbed-{state.root.name.lstrip('.')}-1")
        files.generate_sudo_password(state.sudo_password)

        previous = {machine.name: machine for machine in load_record(state.record)}
        running = {name for name in {*previous, *(m.name for m in wanted)} if _pid(state, name)}
        fleet = _fleet_after_up(wanted, previous, running)
        to_start = [machine for machine in wanted if machine.name not in running]
        # What a systemd machine whose launcher was killed left running (its port too).
        stop_machines(state, [machine.name for machine in to_start])
        _check_ports(fleet, to_start)

        suites = sorted({m.suite for m in to_start if m.suite is not None})
        roots = {suite: template.ensure(suite) for suite in suites}
        for machine in to_start:
            files.prepare_machine(state, machine, roots.get(machine.suite or ""))
        save_record(state.record, fleet)
        files.write_client_files(state, fleet)
        for machine in to_start:
            start_machine(state, machine)
        _wait_ready(state, to_start)
    return to_start


def _fleet_after_up(
    wanted: list[Machine], previous: dict[str, Machine], running: set[str]
) -> list[Machine]:
    """The wanted machines plus those still running; a running machine keeps its old entry."""
    fleet = [previous[m.name] if m.name in running and m.name in previous else m for m in wanted]
    wanted_names = {machine.name for machine in wanted}
    fleet += [m for name, m in previous.items() if name in running and name not in wanted_names]
    return fleet


def _check_ports(fleet: list[Machine], to_start: list[Machine]) -> None:
    ports = [machine.port for machine in fleet]
    if len(set(ports)) != len(ports):
        raise TestbedError(f"two machines would share a port: {ports} (run down first)")
    for machine in to_start:
        for address in {"127.0.0.1", machine.ssh_address}:
            if _port_in_use(machine.port, address):
                raise TestbedError(
                    f"port {address}:{machine.port} for {machine.name} is used by another"
                    f" program (set $FLAKEFLEET_TESTBED_PORT to another base port)"
                )


def _port_in_use(port: int, address: str = "127.0.0.1") -> bool:
    """True if something listens on (or holds) ``address:port``."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # ignore TIME_WAIT leftovers
        try:
            probe.bind((address, port))
        except OSError:
            return True
    return False


def start_machine(state: StatePaths, machine: Machine) -> int:
    """Start a prepared machine's namespace; record and return its ``unshare`` PID.

    A systemd machine's ``unshare`` makes only a private mount namespace and execs the
    machine's launcher (``testbed.nspawn``) in it.
    """
    paths = state.machine(machine.name)
    if machine.systemd:
        _which("systemd-nspawn")
        namespaces, module = ["--mount"], processes.LAUNCHER_MODULE
    else:
        namespaces, module = NAMESPACES, processes.MACHINE_MODULE
    command = [
        *_outer_namespace_prefix(),
        _which("unshare"),
        *namespaces,
        "--propagation",
        "private",
        MACHINE_PYTHON,
        "-m",
        module,
        machine.name,
        str(state.root),
    ]
    with open(paths.console_log, "a") as console:
        console.write(f"== testbed: starting {machine.name} at {time.strftime('%F %T')}\n")
        console.flush()
        pid = os.posix_spawn(
            command[0],
            command,
            MACHINE_ENVIRONMENT,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, console.fileno(), 1),
                (os.POSIX_SPAWN_DUP2, console.fileno(), 2),
            ],
            setsid=True,
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
        )
    files.write_file(paths.pid_file, f"{pid}\n")
    if machine.latency_ms is not None:
        start_relay(state, machine)
    return pid


def start_relay(state: StatePaths, machine: Machine) -> int:
    """Start the relay in front of the machine's sshd (``testbed.relay``); record its PID."""
    paths = state.machine(machine.name)
    command = [
        MACHINE_PYTHON, "-m", processes.RELAY_MODULE, machine.name, str(state.root),
        machine.address, str(machine.port), f"{machine.latency_ms:g}",
    ]  # fmt: skip
    with open(paths.relay_log, "a") as log:
        pid = os.posix_spawn(
            command[0],
            command,
            MACHINE_ENVIRONMENT,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, log.fileno(), 1),
                (os.POSIX_SPAWN_DUP2, log.fileno(), 2),
            ],
            setsid=True,
        )
    files.write_file(paths.relay_pid, f"{pid}\n")
    return pid


def _which(program: str) -> str:
    path = shutil.which(program, path=MACHINE_ENVIRONMENT["PATH"])
    if path is None:
        raise TestbedError(f"{program} is not installed")
    return path


def _outer_namespace_prefix() -> list[str]:
    """Enter the computer's own mount namespace first when run from a runner's namespace."""
    outer = os.environ.get(OUTER_PID_ENV)
    if not outer:
        return []
    return [_which("nsenter"), f"--mount=/proc/{outer}/ns/mnt", "--"]


def _wait_ready(state: StatePaths, machines: list[Machine]) -> None:
    """Wait (in parallel) until each machine's sshd accepts an ssh login."""
    if not machines:
        return
    with ThreadPoolExecutor(max_workers=len(machines)) as pool:
        problems = [p for p in pool.map(lambda m: _wait_one(state, m), machines) if p]
    if problems:
        raise TestbedError("; ".join(problems))


def _wait_one(state: StatePaths, machine: Machine) -> str | None:
    """None once ``ssh <machine> true`` works (on a systemd machine: once its boot has
    finished), else what went wrong."""
    paths = state.machine(machine.name)
    timeout = SYSTEMD_READY_TIMEOUT if machine.systemd else READY_TIMEOUT
    deadline = time.monotonic() + timeout
    pid = processes.read_pid(paths.pid_file)
    while time.monotonic() < deadline:
        # Not _pid(): right after posix_spawn the child's command line may still be empty
        # (exec releases the parent before it sets the new one up).
        if pid is None or not processes.is_alive(pid):
            return f"{machine.name} stopped while booting: {_last_line(paths.console_log)}"
        if _accepts_tcp(machine.port) and _ssh_ready(state, machine, deadline):
            return None
        time.sleep(0.05)
    return f"{machine.name} did not accept ssh within {timeout:g} s (see {paths.console_log})"


def _accepts_tcp(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _ssh_ready(state: StatePaths, machine: Machine, deadline: float) -> bool:
    command = SYSTEMD_READY if machine.systemd else "true"
    result = _ssh(state, machine, command, max(1.0, deadline - time.monotonic()))
    if result is None:
        return False
    if machine.systemd:  # "degraded" (a unit failed) exits 1, yet the boot is over
        return result.stdout.strip() in SYSTEMD_BOOTED
    return result.returncode == 0


def _ssh(
    state: StatePaths, machine: Machine, command: str, timeout: float
) -> subprocess.CompletedProcess[str] | None:
    """Run ``command`` on the machine as root; None if ssh did not finish in time."""
    try:
        return subprocess.run(
            ["ssh", "-F", str(state.ssh_config), "-o", "ConnectTimeout=5", machine.name, command],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None


def _last_line(path: Path) -> str:
    lines = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return lines[-1] if lines else "(no output)"


# -- down --------------------------------------------------------------------------------------


def down(purge: bool = False) -> None:
    """Stop every machine of the state directory; ``purge`` also deletes the directory."""
    state = _state()
    if not state.root.exists():
        return
    if purge and not state.marker.exists():
        raise TestbedError(f"{state.root} is not a testbed state directory; not deleting it")
    with _locked(state):
        names = sorted(p.name for p in state.machines.iterdir()) if state.machines.is_dir() else []
        stop_machines(state, names)
        if purge:
            shutil.rmtree(state.root)


def stop(name: str) -> None:
    """Power one machine off, as if it crashed or lost power; ``up`` starts it again."""
    state = _state()
    if name not in {machine.name for machine in load_record(state.record)}:
        raise TestbedError(f"no machine {name!r} in this test fleet")
    with _locked(state):
        stop_machines(state, [name])


def stop_machines(state: StatePaths, names: list[str]) -> None:
    """SIGTERM each machine's PID 1 and wait until its recorded processes are gone.

    A systemd machine's launcher gets the SIGTERM; it has nspawn halt the machine cleanly.
    Its cgroup directories are emptied and removed in any case.
    """
    recorded: dict[str, list[int]] = {}
    systemd = [name for name in names if _is_systemd(state, name)]
    for name in names:
        relay = processes.running_pid(state.machine(name).relay_pid, name, state.root)
        if relay is not None:
            processes.signal_if_alive(relay, signal.SIGTERM)
            recorded[name] = [relay]
        pid = _pid(state, name)
        if pid is None:
            continue
        if name in systemd:
            recorded.setdefault(name, []).append(pid)
            processes.signal_if_alive(pid, signal.SIGTERM)
            continue
        init = processes.namespace_init(pid, name, state.root)
        recorded.setdefault(name, []).extend([pid] if init is None else [pid, init])
        if init is not None:
            # unshare --fork ignores SIGTERM; its child, PID 1 of the machine, does not.
            processes.signal_if_alive(init, signal.SIGTERM)
        else:
            # No PID 1 (yet): killing unshare also kills its child (--kill-child).
            processes.signal_if_alive(pid, signal.SIGKILL)
    timeout = SYSTEMD_STOP_TIMEOUT if systemd else STOP_TIMEOUT
    alive = processes.wait_gone([pid for pids in recorded.values() for pid in pids], timeout)
    if alive:
        for name, pids in recorded.items():
            for pid in pids:
                if pid in alive and processes.is_machine_process(pid, name, state.root):
                    processes.signal_if_alive(pid, signal.SIGKILL)
        alive = processes.wait_gone(alive, KILL_TIMEOUT)
    for name in systemd:
        alive += _clear_cgroups(state, name)
    if alive:
        raise TestbedError(f"machine processes {alive} did not exit")
    for name in names:
        state.machine(name).pid_file.unlink(missing_ok=True)
        state.machine(name).relay_pid.unlink(missing_ok=True)


def _clear_cgroups(state: StatePaths, name: str) -> list[int]:
    """Kill what is left in a systemd machine's cgroup directories (its launcher was killed,
    or the machine would not halt), then remove them; the PIDs that would not die."""
    directories = [hierarchy / state.cgroup(name) for hierarchy in cgroup_hierarchies()]
    pids = [pid for directory in directories for pid in processes.cgroup_pids(directory)]
    if pids:
        for directory in directories:
            processes.kill_cgroup(directory)
        pids = processes.wait_gone(sorted(set(pids)), KILL_TIMEOUT)
    for directory in directories:
        processes.remove_cgroup_tree(directory)
    return pids


def _is_systemd(state: StatePaths, name: str) -> bool:
    kind = state.machine(name).kind
    return kind.exists() and kind.read_text().strip() == "systemd"


def _pid(state: StatePaths, name: str) -> int | None:
    return processes.running_pid(state.machine(name).pid_file, name, state.root)


def _init(state: StatePaths, name: str) -> int | None:
    """The machine's PID 1 as seen from outside (a systemd machine's systemd), if running."""
    pid = _pid(state, name)
    if pid is None:
        return None
    if _is_systemd(state, name):
        return processes.systemd_init(pid, name, state.root)
    return processes.namespace_init(pid, name, state.root)


# -- status and reboot -------------------------------------------------------------------------


def _inside(state: StatePaths, name: str) -> Path | None:
    """The machine's root directory as seen from outside (through its PID 1), if running."""
    init = _init(state, name)
    return Path(f"/proc/{init}/root") if init else None


def status(roster: Path) -> list[MachineStatus]:
    """The machines of the last ``up`` (else of the roster), running or not."""
    state = _state()
    machines = load_record(state.record)
    if not machines and roster.exists():
        machines = load_roster(roster, base_port())
    result = []
    for machine in machines:
        root = _inside(state, machine.name)
        system = None
        if root is not None:
            # A home-manager machine runs what its user's profile selects: in its home since
            # Nix 2.14, else in the per-user directory.
            links = (
                [
                    f"var/lib/{machine.user}/.local/state/nix/profiles/home-manager",
                    f"nix/var/nix/profiles/per-user/{machine.user}/home-manager",
                ]
                if machine.klass == "home"
                else ["run/current-system"]
            )
            for link in links:
                with contextlib.suppress(OSError):
                    system = system or _store_path_inside(root, "/" + link)
        result.append(MachineStatus(machine, root is not None, system))
    return result


def _store_path_inside(root: Path, link: str) -> str | None:
    """Follow a machine's symlink chain (seen through /proc/PID/root) to its store path."""
    for _ in range(8):
        target = os.readlink(root / link.lstrip("/"))
        link = target if target.startswith("/") else str(Path(link).parent / target)
        if link.startswith("/nix/store/"):
            return "/".join(link.split("/")[:4])
    return None


def reboot(name: str) -> str:
    """Stop the machine's namespace and start it again; return its new boot id.

    ``/run`` comes back empty; the store, /etc and /var persist; the machine boots the system
    its bootloader selected (``/var/lib/fake-bootloader/default``). A running systemd machine
    reboots itself instead (ctrl-alt-del: SIGINT to its systemd), with a new boot id.
    """
    state = _state()
    machines = {machine.name: machine for machine in load_record(state.record)}
    if name not in machines:
        known = ", ".join(machines) or "none; run up first"
        raise TestbedError(f"unknown machine {name!r} (machines: {known})")
    machine = machines[name]
    with _locked(state):
        if machine.systemd and (init := _init(state, name)) is not None:
            return _reboot_systemd(state, machine, init)
        stop_machines(state, [name])
        if _port_in_use(machine.port):
            raise TestbedError(
                f"port 127.0.0.1:{machine.port} for {name} is used by another program"
            )
        files.prepare_machine(
            state, machine, template.ensure(machine.suite) if machine.suite else None
        )
        start_machine(state, machine)
        _wait_ready(state, [machine])
    if machine.systemd:
        return _boot_id(state, machine)
    root = _inside(state, name)
    if root is None:
        raise TestbedError(f"{name} stopped right after booting")
    return (root / BOOT_ID_FILE.lstrip("/")).read_text().strip()


def _reboot_systemd(state: StatePaths, machine: Machine, init: int) -> str:
    """Have a running systemd machine reboot itself; wait for its next boot to finish."""
    processes.signal_if_alive(init, signal.SIGINT)  # systemd starts ctrl-alt-del.target
    deadline = time.monotonic() + SYSTEMD_STOP_TIMEOUT
    while _init(state, machine.name) in (init, None):
        if _pid(state, machine.name) is None:
            raise TestbedError(f"{machine.name} stopped instead of rebooting")
        if time.monotonic() > deadline:
            raise TestbedError(f"{machine.name} did not reboot within {SYSTEMD_STOP_TIMEOUT:g} s")
        time.sleep(0.05)
    _wait_ready(state, [machine])
    return _boot_id(state, machine)


def _boot_id(state: StatePaths, machine: Machine) -> str:
    """The machine's boot id, as a login on it reads it (nspawn gives each boot its own)."""
    result = _ssh(state, machine, f"cat {KERNEL_BOOT_ID}", 30.0)
    if result is None or result.returncode != 0:
        raise TestbedError(f"could not read {machine.name}'s boot id")
    return result.stdout.strip()
