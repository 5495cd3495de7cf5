"""The test fleet for real: three machines up, isolated, rebooted, recovered and stopped.

Needs root (mount namespaces, overlayfs), util-linux, openssh-server and nix-bin. Uses its own
state directory and base port 22600 (``FLAKEFLEET_TESTBED_TEST_PORT``), so a developer's
fleet keeps running beside it. The module runs its tests in order on one fleet.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from testbed.files import boot_default_command
from testbed.processes import run_cli

ROSTER = Path(__file__).with_name("hosts.json")
BASE_PORT = int(os.environ.get("FLAKEFLEET_TESTBED_TEST_PORT", "22600"))
MACHINES = ["web1", "web2", "mac1"]  # mac1 imitates nix-darwin
GUARDED = [
    "/etc/passwd",
    "/etc/shadow",
    "/etc/group",
    "/etc/hosts",
    "/etc/nix/nix.conf",
    "/usr/bin/nix",
]
FAKE_SYSTEM = "/nix/store/00000000000000000000000000000000-nixos-system-web1-1"

# Without them this module skips; tests/conftest.py says so loudly, and fails the run when
# FLAKEFLEET_REQUIRE_FLEET is set (bin/test sets it).
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0
    or not all(Path(p).exists() for p in ("/usr/bin/unshare", "/usr/sbin/sshd", "/usr/bin/nix")),
    reason="the test fleet needs root, util-linux, openssh-server and nix-bin",
)


def _digests() -> dict[str, str]:
    return {path: hashlib.md5(Path(path).read_bytes()).hexdigest() for path in GUARDED}


class Fleet:
    """A test fleet in its own state directory, driven through the command line and ssh."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.env = {
            **os.environ,
            "FLAKEFLEET_TESTBED_STATE": str(state),
            "FLAKEFLEET_TESTBED_PORT": str(BASE_PORT),
        }

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(list(args), self.env, timeout=60)

    def ssh(self, target: str, command: str, *options: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ssh", "-F", str(self.state / "ssh_config"), *options, target, command],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )

    def output(self, target: str, command: str) -> str:
        completed = self.ssh(target, command)
        assert completed.returncode == 0, f"{target}: {command}: {completed.stderr}"
        return completed.stdout.strip()

    def pids(self) -> list[int]:
        """Recorded unshare PIDs and their children (each machine's PID 1)."""
        pids = []
        for pid_file in self.state.glob("machines/*/pid"):
            pid = int(pid_file.read_text())
            children = Path(f"/proc/{pid}/task/{pid}/children")
            pids += [pid, *map(int, children.read_text().split())]
        return pids


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture(scope="module")
def guarded_digests() -> dict[str, str]:
    return _digests()


@pytest.fixture(scope="module")
def testbed(
    tmp_path_factory: pytest.TempPathFactory, guarded_digests: dict[str, str]
) -> Iterator[Fleet]:
    # Under /tmp on purpose: machines mount their own /tmp only after their other mounts.
    fleet = Fleet(tmp_path_factory.mktemp("testbed") / "state")
    try:  # `up` may fail half-way, with some machines running
        completed = fleet.cli("up", "--machines", "3", "--roster", str(ROSTER))
        assert completed.returncode == 0, completed.stderr
        yield fleet
    finally:
        fleet.cli("down", "--purge")


def test_up_writes_the_fleet_file(testbed: Fleet) -> None:
    fleet = yaml.safe_load((testbed.state / "fleet.yaml").read_text())
    assert fleet["ssh"] == {"key": "keys/id_ed25519", "known_hosts": "known_hosts"}
    assert [(m["name"], m["port"], m["roles"]) for m in fleet["machines"]] == [
        ("web1", BASE_PORT + 1, ["web"]),
        ("web2", BASE_PORT + 2, ["web"]),
        ("mac1", BASE_PORT + 3, ["workstation"]),
    ]
    known_hosts = (testbed.state / "known_hosts").read_text().splitlines()
    assert [line.split()[0] for line in known_hosts] == [
        f"{name},[127.0.0.1]:{BASE_PORT + 1 + i}" for i, name in enumerate(MACHINES)
    ]


def test_each_machine_answers_with_its_name(testbed: Fleet) -> None:
    for name in MACHINES:
        assert testbed.output(name, "hostname; cat /etc/hostname") == f"{name}\n{name}"
    # Only NixOS machines say they are.
    assert testbed.output("web1", "test -e /etc/NIXOS && echo nixos") == "nixos"
    assert testbed.output("mac1", "test -e /etc/NIXOS || echo other") == "other"


def test_darwin_machine_keeps_nix_off_every_path(testbed: Fleet) -> None:
    """As on macOS: Nix is in the default profile only; no login's PATH, nor sudo's, finds it."""
    profile = "/nix/var/nix/profiles/default/bin"
    # A second boot finds its layer already without Nix.
    for boot in ("first", "second"):
        for login in ("mac1", "deploy@mac1"):
            completed = testbed.ssh(login, "command -v nix nix-store nix-env nix-daemon")
            assert completed.returncode != 0 and completed.stdout == "", (boot, login)
        assert testbed.ssh("mac1", "ls /usr/bin/nix* /bin/nix").returncode != 0
        assert testbed.output("mac1", "sudo sh -c 'command -v nix || echo none'") == "none"
        # Nix works from the profile, its daemon included (started from there, as by launchd).
        assert "daemon" in testbed.output("deploy@mac1", f"{profile}/nix store ping 2>&1")
        assert testbed.output("mac1", f"{profile}/nix-store --version").startswith("nix-store")
        # Builds on remote builders run Nix's build hook, which is now the profile's too.
        hook = testbed.output("mac1", "readlink -e /usr/libexec/nix/build-remote")
        assert hook == f"{profile}/nix"
        if boot == "first":
            assert testbed.cli("stop", "mac1").returncode == 0
            completed = testbed.cli("up", "--machines", "3", "--roster", str(ROSTER))
            assert completed.returncode == 0, completed.stderr
    # Nor has it what a stock Mac lacks (util-linux's, coreutils' and systemd's programs).
    for name in ("setsid", "flock", "timeout", "systemd-run", "systemctl"):
        assert testbed.ssh("mac1", f"command -v {name}").returncode != 0, name
    assert testbed.output("web1", "command -v setsid") == "/usr/bin/setsid"
    # The other machines, and this computer, keep Nix where Debian put it.
    assert testbed.output("web1", "command -v nix-store") == "/usr/bin/nix-store"
    assert Path("/usr/bin/nix-store").exists()


def test_host_keys_are_checked(testbed: Fleet, tmp_path: Path) -> None:
    """web2's key under web1's names: ssh must refuse to talk to web1."""
    lines = (testbed.state / "known_hosts").read_text().splitlines()
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"{lines[0].split()[0]} {' '.join(lines[1].split()[1:])}\n")
    completed = testbed.ssh("web1", "true", "-o", f"UserKnownHostsFile={wrong}")
    assert completed.returncode == 255


def test_each_machine_has_its_own_store(testbed: Fleet) -> None:
    testbed.output("web1", "echo web1 > /nix/testbed-marker")
    assert testbed.ssh("web2", "test -e /nix/testbed-marker").returncode == 1
    assert not Path("/nix/testbed-marker").exists()
    assert (testbed.state / "machines/web1/nix/testbed-marker").read_text() == "web1\n"
    # The non-root deploy user reaches the machine's nix-daemon.
    assert "daemon" in testbed.output("deploy@web2", "nix store ping 2>&1")


def test_etc_writes_stay_inside(testbed: Fleet) -> None:
    testbed.output(
        "web1",
        "echo probe > /etc/testbed-probe; getent hosts web1 | grep -q '^127\\.[0-9.]* *web1$'",
    )
    assert not Path("/etc/testbed-probe").exists()
    assert (testbed.state / "machines/web1/etc.upper/testbed-probe").exists()


def test_what_a_machine_shares_with_this_computer_is_read_only_inside_it(testbed: Fleet) -> None:
    for path in ("/testbed-probe", "/opt/testbed-probe", "/usr/local/testbed-probe"):
        completed = testbed.ssh("web1", f"mkdir {path}")
        assert completed.returncode != 0
        assert "Read-only file system" in completed.stderr, completed.stderr
        assert not Path(path).exists()
    # Its own filesystems stay writable.
    testbed.output("web1", "for d in /etc /var /root /nix /run /tmp; do touch $d/.probe; done")
    testbed.output("deploy@web1", "touch ~/.probe")


def test_reboot_empties_run_and_boots_the_selected_system(testbed: Fleet) -> None:
    old_boot_id = testbed.output("web1", "cat /run/boot-id")
    activate = '#!/bin/sh\necho "activating $0"\ntouch /run/activated\n'
    testbed.output("web1", f"touch /run/probe && {boot_default_command(FAKE_SYSTEM, activate)}")
    completed = testbed.cli("reboot", "web1")
    assert completed.returncode == 0, completed.stderr
    new_boot_id = completed.stdout.strip()
    assert new_boot_id != old_boot_id
    assert testbed.output("web1", "cat /run/boot-id") == new_boot_id
    assert testbed.output("web1", "ls /run/probe 2>&1 || true").endswith(
        "No such file or directory"
    )
    assert testbed.output("web1", "cat /etc/testbed-probe /nix/testbed-marker") == "probe\nweb1"
    assert testbed.output("web1", "readlink /run/current-system /run/booted-system") == (
        f"{FAKE_SYSTEM}\n{FAKE_SYSTEM}"
    )
    assert f"activating {FAKE_SYSTEM}/activate" in testbed.output("web1", "cat /var/log/boot.log")
    testbed.output("web1", "test -e /run/activated")
    status = testbed.cli("status").stdout.splitlines()
    assert status[0].split() == ["web1", str(BASE_PORT + 1), "up", FAKE_SYSTEM]
    assert status[1].split() == ["web2", str(BASE_PORT + 2), "up", "-"]


def test_sshd_comes_back_after_being_killed(testbed: Fleet) -> None:
    boot_id = testbed.output("web2", "cat /run/boot-id")
    testbed.ssh("web2", "kill $(cat /run/sshd.pid)")
    # The init restarts it a second after it exits; a loaded machine may take longer.
    deadline = time.monotonic() + 60
    while testbed.ssh("web2", "true").returncode != 0:
        assert time.monotonic() < deadline, "sshd did not come back within 60 s"
        time.sleep(0.2)
    assert testbed.output("web2", "cat /run/boot-id") == boot_id  # the machine did not restart


def test_up_again_changes_nothing(testbed: Fleet) -> None:
    before = testbed.pids()
    completed = testbed.cli("up", "--machines", "3", "--roster", str(ROSTER))
    assert completed.returncode == 0, completed.stderr
    assert "started nothing" in completed.stdout
    assert testbed.pids() == before


def test_down_leaves_nothing_behind(testbed: Fleet, guarded_digests: dict[str, str]) -> None:
    pids = testbed.pids()
    assert len(pids) == 2 * len(MACHINES)
    completed = testbed.cli("down")
    assert completed.returncode == 0, completed.stderr
    assert not [pid for pid in pids if _alive(pid)]
    for port in range(BASE_PORT + 1, BASE_PORT + 1 + len(MACHINES)):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
    assert [line.split()[2] for line in testbed.cli("status").stdout.splitlines()] == ["down"] * 3
    assert _digests() == guarded_digests
