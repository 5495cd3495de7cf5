"""A systemd machine of the test fleet, for real: systemd as PID 1 under systemd-nspawn, Nix
2.26, NixOS's unit PATH, transient and failed units, reboots, and a ``down`` that leaves no
process, mount or cgroup directory behind.

Needs root. The first run builds the machines' root file system with debootstrap (about a
minute; then cached in /var/cache/flakefleet): if that fails, the module fails with the reason.
Uses its own state directory and base port 22650 (``FLAKEFLEET_TESTBED_TEST_PORT`` + 50): web1
is a systemd machine by ``up --systemd``, web2 a namespace machine beside it, small1 a
systemd machine by the roster's knob, with a small ``/nix``, sid1 one on Debian sid's Nix and
home1 a home-manager machine whose user has its own systemd manager. The module runs its tests
in order on one fleet, and waits on events with generous deadlines, never on timings.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest
import yaml

from testbed.files import boot_default_command
from testbed.layout import SYSTEMD_BIN, MachinePaths, StatePaths, cache_dir, cgroup_hierarchies
from testbed.processes import run_cli

BASE_PORT = int(os.environ.get("FLAKEFLEET_TESTBED_TEST_PORT", "22600")) + 50
ROSTER = {
    "web1": {"class": "nixos", "roles": ["web"]},
    "web2": {"class": "nixos", "roles": ["web"]},
    "small1": {"class": "nixos", "roles": [], "systemd": True, "nixSize": "64m"},
    "sid1": {"class": "nixos", "roles": [], "nix": "sid"},
    "home1": {"class": "home", "roles": [], "user": "deploy", "nix": "trixie"},
}
MACHINES = list(ROSTER)
DEADLINE = 120.0  # seconds to wait for any one event (a boot, a unit, a reboot)
BOOT_ID = "cat /proc/sys/kernel/random/boot_id"
FAKE_SYSTEM = "/nix/store/00000000000000000000000000000000-nixos-system-web1-1"
GUARDED = ["/etc/passwd", "/etc/shadow", "/etc/group", "/etc/hosts", "/etc/nix/nix.conf"]

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="systemd machines need root (mount namespaces, overlayfs, nspawn)"
)


class Fleet:
    """A test fleet in its own state directory, driven through the command line and ssh."""

    def __init__(self, state: Path, roster: Path) -> None:
        self.state = state
        self.roster = roster
        self.env = {
            **os.environ,
            "FLAKEFLEET_TESTBED_STATE": str(state),
            "FLAKEFLEET_TESTBED_PORT": str(BASE_PORT),
        }

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run_cli(list(args), self.env, timeout=timeout)

    def up(self, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.cli("up", "--systemd", "web1", "--roster", str(self.roster), timeout=timeout)

    def ssh(self, target: str, command: str, *options: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ssh", "-F", str(self.state / "ssh_config"), *options, target, command],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            timeout=DEADLINE,
        )

    def output(self, target: str, command: str) -> str:
        completed = self.ssh(target, command)
        assert completed.returncode == 0, f"{target}: {command}: {completed.stderr}"
        return completed.stdout.strip()

    def cgroups(self) -> list[Path]:
        """web1's cgroup directories, one per hierarchy."""
        relative = StatePaths(self.state).cgroup("web1")
        return [hierarchy / relative for hierarchy in cgroup_hierarchies()]

    def processes(self) -> set[tuple[int, str]]:
        """web1's processes (its launcher and everything in its cgroups), with start times."""
        pids = {int((self.state / "machines/web1/pid").read_text())}
        for directory in self.cgroups():
            # A session's scope may go while the tree is walked (os.walk skips it then).
            for parent, _, names in os.walk(directory):
                if "cgroup.procs" in names:
                    with contextlib.suppress(FileNotFoundError):
                        pids |= {int(p) for p in Path(parent, "cgroup.procs").read_text().split()}
        return {(pid, start) for pid in pids if (start := _start_time(pid))}


def _start_time(pid: int) -> str | None:
    """A live PID's start time (a PID reused by another process has another one); None once
    it has exited (a zombie too: this computer's PID 1 may never reap an orphan)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _mounts_of(state: Path) -> list[str]:
    """This computer's mounts that name the state directory or the template cache (a leaked
    overlay or tmpfs would)."""
    names = (str(state), str(cache_dir()))
    lines = Path("/proc/mounts").read_text().splitlines()
    return [line for line in lines if any(name in line for name in names)]


def _wait_for(what: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE
    while not check():
        assert time.monotonic() < deadline, f"waited {DEADLINE:g} s for {what}"
        time.sleep(0.2)


def _refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def _digests() -> dict[str, str]:
    return {path: hashlib.sha256(Path(path).read_bytes()).hexdigest() for path in GUARDED}


@pytest.fixture(scope="module")
def guarded_digests() -> dict[str, str]:
    return _digests()


@pytest.fixture(scope="module")
def testbed(guarded_digests: dict[str, str]) -> Iterator[Fleet]:
    # Not in pytest's basetemp: other pytest runs on this computer rotate it away.
    directory = Path(tempfile.mkdtemp(prefix="flakefleet-testbed-systemd-"))
    roster = directory / "hosts.json"
    roster.write_text(json.dumps(ROSTER))
    fleet = Fleet(directory / "state", roster)
    try:
        # The first run builds the template: give debootstrap its time, and show its reason.
        completed = fleet.up(timeout=1200)
        assert completed.returncode == 0, f"up failed:\n{completed.stderr}"
        yield fleet
    finally:
        fleet.cli("down", "--purge")
        roster.unlink()
        directory.rmdir()


def test_fleet_file_asks_systemd_to_reboot(testbed: Fleet) -> None:
    fleet = yaml.safe_load((testbed.state / "fleet.yaml").read_text())
    machines = {machine["name"]: machine for machine in fleet["machines"]}
    for systemd in ("web1", "small1"):
        assert machines[systemd]["data"] == {"reboot_command": "systemctl reboot"}
    assert "data" not in machines["web2"]
    assert [machines[name]["port"] for name in MACHINES] == [
        BASE_PORT + 1 + index for index in range(len(MACHINES))
    ]
    config = (testbed.state / "ssh_config").read_text()
    assert config.count("StrictHostKeyChecking yes") == len(MACHINES)


def test_host_key_is_checked(testbed: Fleet, tmp_path: Path) -> None:
    """web2's key under web1's names: ssh must refuse to talk to web1."""
    lines = (testbed.state / "known_hosts").read_text().splitlines()
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"{lines[0].split()[0]} {' '.join(lines[1].split()[1:])}\n")
    assert testbed.ssh("web1", "true", "-o", f"UserKnownHostsFile={wrong}").returncode == 255


def test_systemd_is_pid_1_and_the_boot_finished(testbed: Fleet) -> None:
    assert testbed.output("web1", "cat /proc/1/comm") == "systemd"
    state = testbed.ssh("web1", "systemctl is-system-running --wait").stdout.strip()
    assert state in ("running", "degraded"), testbed.output("web1", "systemctl --failed")
    assert testbed.output("web1", "hostname; cat /etc/hostname") == "web1\nweb1"
    assert testbed.output("web1", "test -e /etc/NIXOS && echo nixos") == "nixos"
    # Its own machine id, and its name on its own loopback address (services listen there).
    machine_id = testbed.output("web1", "cat /etc/machine-id")
    assert len(machine_id) == 32 and machine_id != Path("/etc/machine-id").read_text().strip()
    address = testbed.output("web1", "getent hosts web1").split()[0]
    assert address.startswith("127.") and address != "127.0.0.1"


def test_current_nix_beside_debians(testbed: Fleet) -> None:
    assert testbed.output("web1", "nix --version").startswith("nix (Nix) 2.26.")
    assert testbed.output("web2", "nix --version").startswith("nix (Nix) 2.8.")
    # A non-root user reaches the machine's nix-daemon (socket-activated) and may sudo.
    info = testbed.output("deploy@web1", "nix store info 2>&1")
    assert "Store URL: daemon" in info and "Trusted: 1" in info
    assert testbed.output("deploy@web1", "sudo -n id -un") == "root"


def test_ssh_sessions_are_counted_from_the_console(testbed: Fleet) -> None:
    """A systemd machine's sshd logs to its journal, which its console log gets too: bench/
    and the tests count sessions there, as on a namespace machine."""
    for name in ("web1", "web2"):
        paths = StatePaths(testbed.state).machine(name)
        expected = paths.ssh_sessions() + 3
        for _ in range(3):
            testbed.output(name, "true")
        _wait_for(f"{name}'s console to show 3 more sessions", partial(_at_least, paths, expected))
        assert paths.ssh_sessions() == expected


def _at_least(paths: MachinePaths, sessions: int) -> bool:
    return paths.ssh_sessions() >= sessions


def test_the_nix_knob_gives_sids_nix(testbed: Fleet) -> None:
    assert testbed.output("sid1", "nix --version").startswith("nix (Nix) 2.34.")
    assert testbed.output("sid1", "cat /proc/1/comm") == "systemd"
    assert "sid" in testbed.output("sid1", "cat /etc/debian_version")


def test_a_home_machine_has_its_users_own_systemd_manager(testbed: Fleet) -> None:
    """Lingering on, as home-manager's user units need: logind starts user@UID at boot."""
    uid = testbed.output("home1", "id -u deploy")
    assert testbed.output("home1", f"systemctl is-active user@{uid}.service") == "active"
    assert testbed.output("home1", "loginctl show-user deploy -P Linger") == "yes"
    state = testbed.ssh("deploy@home1", "systemctl --user is-system-running --wait").stdout
    assert state.strip() in ("running", "degraded")
    assert testbed.output("home1", "nix --version").startswith("nix (Nix) 2.26.")


def test_the_root_is_an_overlay_that_never_shows_here(testbed: Fleet) -> None:
    assert _mounts_of(testbed.state) == []
    testbed.output("web1", "echo probe > /etc/testbed-probe")
    assert not Path("/etc/testbed-probe").exists()
    upper = testbed.state / "machines/web1/rootfs.upper/etc/testbed-probe"
    assert upper.read_text() == "probe\n"
    testbed.output("web1", "echo web1 > /nix/testbed-marker")
    assert (testbed.state / "machines/web1/nix/testbed-marker").read_text() == "web1\n"


def test_transient_unit_outlives_the_ssh_session(testbed: Fleet) -> None:
    # The session ends as soon as systemd-run has started the unit.
    testbed.output(
        "web1",
        "rm -f /run/outlived; systemd-run --unit=flakefleet-test-outlive --collect --quiet --"
        " /bin/sh -c '/usr/bin/sleep 2; /usr/bin/touch /run/outlived; exec /usr/bin/sleep 600'",
    )
    _wait_for(
        "the unit to finish its work after the session ended",
        lambda: testbed.ssh("web1", "test -e /run/outlived").returncode == 0,
    )
    assert testbed.output("web1", "systemctl is-active flakefleet-test-outlive") == "active"
    cgroup = testbed.output("web1", "systemctl show -P ControlGroup flakefleet-test-outlive")
    assert cgroup == "/system.slice/flakefleet-test-outlive.service"  # not the session's
    testbed.output("web1", "systemctl stop flakefleet-test-outlive")


def test_units_see_only_nixos_path(testbed: Fleet) -> None:
    """As on NixOS (nixpkgs#261691): systemd's own programs, and no coreutils."""
    script = 'echo "$PATH"; command -v systemctl; command -v mv || echo no-mv'
    lines = testbed.output("web1", f"systemd-run --wait --pipe --quiet -- /bin/sh -c '{script}'")
    assert lines.splitlines() == [SYSTEMD_BIN, f"{SYSTEMD_BIN}/systemctl", "no-mv"]
    moved = testbed.ssh("web1", "systemd-run --wait --quiet -- /bin/sh -c 'mv /tmp/a /tmp/b'")
    assert moved.returncode != 0
    assert testbed.output("web1", "command -v mv") == "/usr/bin/mv"  # the session keeps its PATH


def test_a_failing_unit_shows_in_systemctl_failed(testbed: Fleet) -> None:
    testbed.output("web1", "systemd-run --unit=flakefleet-test-fails --quiet -- /bin/false")
    _wait_for(
        "the unit to fail",
        lambda: (
            "flakefleet-test-fails.service"
            in testbed.ssh("web1", "systemctl --failed --no-legend --plain").stdout
        ),
    )
    assert testbed.ssh("web1", "systemctl is-system-running").stdout.strip() == "degraded"
    testbed.output("web1", "systemctl reset-failed")
    assert testbed.ssh("web1", "systemctl --failed --no-legend").stdout.strip() == ""


def test_reboot_from_inside_gives_a_new_boot(testbed: Fleet) -> None:
    boot_id = testbed.output("web1", BOOT_ID)
    launcher = (testbed.state / "machines/web1/pid").read_text()
    testbed.output("web1", "touch /run/before-reboot /etc/before-reboot")
    testbed.ssh("web1", "systemctl reboot")  # the connection may die with the machine

    def rebooted() -> bool:
        completed = testbed.ssh("web1", BOOT_ID)
        return completed.returncode == 0 and completed.stdout.strip() not in ("", boot_id)

    _wait_for("web1 to come back with a new boot id", rebooted)
    state = testbed.ssh("web1", "systemctl is-system-running --wait").stdout.strip()
    assert state in ("running", "degraded")
    assert testbed.ssh("web1", "test -e /run/before-reboot").returncode == 1  # a fresh /run
    testbed.output("web1", "test -e /etc/before-reboot")
    # The launcher restarted nspawn; the machine never stopped being up.
    assert (testbed.state / "machines/web1/pid").read_text() == launcher
    assert testbed.cli("status").stdout.splitlines()[0].split()[:3] == [
        "web1",
        str(BASE_PORT + 1),
        "up",
    ]


def test_reboot_command_waits_for_the_new_boot(testbed: Fleet) -> None:
    boot_id = testbed.output("web1", BOOT_ID)
    completed = testbed.cli("reboot", "web1")
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() != boot_id
    assert testbed.output("web1", BOOT_ID) == completed.stdout.strip()


def test_boot_activates_the_selected_system(testbed: Fleet) -> None:
    """NixOS's stage 2, imitated: a boot links /run/booted-system and /run/current-system to
    what the bootloader selected and runs its activate, before sshd."""
    activate = "#!/bin/sh\necho activating\ntouch /run/activated\n"
    testbed.output("web1", boot_default_command(FAKE_SYSTEM, activate))
    completed = testbed.cli("reboot", "web1")
    assert completed.returncode == 0, completed.stderr
    assert testbed.output("web1", "readlink /run/current-system /run/booted-system") == (
        f"{FAKE_SYSTEM}\n{FAKE_SYSTEM}"
    )
    testbed.output("web1", "test -e /run/activated")
    assert f"activating {FAKE_SYSTEM}" in testbed.output("web1", "cat /var/log/boot.log")
    status = testbed.cli("status").stdout.splitlines()
    assert status[0].split() == ["web1", str(BASE_PORT + 1), "up", FAKE_SYSTEM]


def test_small_nix_lasts_across_reboots_not_stops(testbed: Fleet) -> None:
    """A small /nix (nixSize) is a tmpfs of that size: a reboot keeps it, a stop empties it."""
    assert "size=65536k" in testbed.output("small1", "findmnt -n -o OPTIONS /nix")
    testbed.output("small1", "echo small1 > /nix/marker")
    completed = testbed.cli("reboot", "small1")
    assert completed.returncode == 0, completed.stderr
    assert testbed.output("small1", "cat /nix/marker") == "small1"
    assert not (testbed.state / "machines/small1/nix/marker").exists()  # never on this computer
    assert testbed.cli("stop", "small1").returncode == 0
    completed = testbed.up()
    assert completed.returncode == 0, completed.stderr
    assert testbed.ssh("small1", "test -e /nix/marker").returncode == 1


def test_a_killed_launcher_leaves_no_machine_running(testbed: Fleet) -> None:
    """nspawn halts the machine when its launcher dies; the next up clears what is left."""
    processes = testbed.processes()
    launcher = int((testbed.state / "machines/web1/pid").read_text())
    os.kill(launcher, signal.SIGKILL)
    _wait_for(
        "web1 to halt without its launcher",
        lambda: not processes & {(pid, _start_time(pid)) for pid, _ in processes},
    )
    completed = testbed.up()
    assert completed.returncode == 0, completed.stderr
    assert "started web1 " in completed.stdout
    assert testbed.output("web1", "cat /proc/1/comm") == "systemd"


def test_stop_and_up_again(testbed: Fleet) -> None:
    machine_id = testbed.output("web1", "cat /etc/machine-id")
    processes = testbed.processes()
    completed = testbed.cli("stop", "web1")
    assert completed.returncode == 0, completed.stderr
    assert not processes & {(pid, _start_time(pid)) for pid, _ in processes}
    assert not any(directory.exists() for directory in testbed.cgroups())
    assert _refuses(BASE_PORT + 1)
    status = [line.split()[:3] for line in testbed.cli("status").stdout.splitlines()]
    assert status[:2] == [["web1", str(BASE_PORT + 1), "down"], ["web2", str(BASE_PORT + 2), "up"]]

    completed = testbed.up()
    assert completed.returncode == 0, completed.stderr
    assert "started web1 " in completed.stdout
    # The same machine: its id, /etc and host key (strict checking still passes) are kept.
    assert testbed.output("web1", "cat /etc/machine-id /etc/testbed-probe") == (
        f"{machine_id}\nprobe"
    )


def test_down_leaves_nothing_behind(testbed: Fleet, guarded_digests: dict[str, str]) -> None:
    processes = testbed.processes()
    assert len(processes) >= 4  # launcher, nspawn, systemd, sshd at least
    assert all(directory.is_dir() for directory in testbed.cgroups())
    completed = testbed.cli("down")
    assert completed.returncode == 0, completed.stderr
    assert not processes & {(pid, _start_time(pid)) for pid, _ in processes}
    assert not any(directory.exists() for directory in testbed.cgroups())
    assert _mounts_of(testbed.state) == []
    assert all(_refuses(BASE_PORT + 1 + index) for index in range(len(MACHINES)))
    status = [line.split()[2] for line in testbed.cli("status").stdout.splitlines()]
    assert status == ["down"] * len(MACHINES)
    assert _digests() == guarded_digests
