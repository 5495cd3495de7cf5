"""The test fleet beyond its roster: twelve machines (the example's seven and five copies),
reached through relays that add a round trip, answer over SSH and leave nothing when down.

Needs root, util-linux, openssh-server, nix-bin and systemd-container (the example's systemd
machines). Its own state directory, on ``FLAKEFLEET_TESTBED_TEST_PORT`` + 100 (the other
modules' fleets use the ports just above the base).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from testbed.layout import StatePaths
from testbed.processes import run_cli
from testbed.roster import Machine, load_record

BASE_PORT = int(os.environ.get("FLAKEFLEET_TESTBED_TEST_PORT", "22600")) + 100
ROUND_TRIP = 0.3  # seconds: far above a loopback SSH banner's (well under a millisecond)
MACHINES = [
    "web1", "web2", "db1", "vpn1", "build1", "mac1", "home1",
    "web3", "web4", "db2", "vpn2", "build2",
]  # fmt: skip

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0
    or not all(
        Path(p).exists()
        for p in ("/usr/bin/unshare", "/usr/sbin/sshd", "/usr/bin/nix", "/usr/bin/systemd-nspawn")
    ),
    reason="the test fleet needs root, util-linux, openssh-server, nix-bin and systemd-container",
)


class Fleet:
    def __init__(self, state: Path) -> None:
        self.state = state
        self.env = {
            **os.environ,
            "FLAKEFLEET_TESTBED_STATE": str(state),
            "FLAKEFLEET_TESTBED_PORT": str(BASE_PORT),
        }

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(list(args), self.env, timeout=120)

    def ssh(self, name: str, command: str) -> str:
        completed = subprocess.run(
            ["ssh", "-F", str(self.state / "ssh_config"), name, command],
            capture_output=True, text=True, check=False, timeout=60,
        )  # fmt: skip
        assert completed.returncode == 0, f"{name}: {command}: {completed.stderr}"
        return completed.stdout.strip()

    def machines(self) -> list[Machine]:
        return load_record(self.state / "machines.json")

    def recorded_pids(self) -> list[int]:
        """Each machine's unshare or launcher PID and its relay's."""
        files = [*self.state.glob("machines/*/pid"), *self.state.glob("machines/*/relay.pid")]
        return [int(path.read_text()) for path in files]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path_factory.mktemp("testbed-scale") / "state")
    try:
        latency = f"{ROUND_TRIP * 1000:g}ms"
        completed = fleet.cli("up", "--machines", "12", "--latency", latency)
        assert completed.returncode == 0, completed.stderr
        yield fleet
    finally:
        fleet.cli("down", "--purge")


def test_the_roster_repeats_with_meaningful_names(fleet: Fleet) -> None:
    machines = fleet.machines()
    assert [m.name for m in machines] == MACHINES
    assert [m.port for m in machines] == list(range(BASE_PORT + 1, BASE_PORT + 13))
    listed = yaml.safe_load((fleet.state / "fleet.yaml").read_text())["machines"]
    assert [(m["name"], m["class"], m["roles"]) for m in listed][7:] == [
        ("web3", "nixos", ["web"]),
        ("web4", "nixos", ["web"]),
        ("db2", "nixos", ["db"]),
        ("vpn2", "nixos", ["vpn"]),
        ("build2", "nixos", ["builder"]),
    ]


def test_each_machine_answers_over_ssh_through_its_relay(fleet: Fleet) -> None:
    with ThreadPoolExecutor(max_workers=len(MACHINES)) as pool:
        names = list(pool.map(lambda name: fleet.ssh(name, "hostname"), MACHINES))
    assert names == MACHINES
    for machine in fleet.machines():
        sent, received, _ = _relayed(fleet, machine.name)
        assert sent > 0 and received > 0, machine.name  # the relay saw the SSH session


def test_a_round_trip_through_the_relay_takes_the_latency(fleet: Fleet) -> None:
    """The first answer to a new connection (sshd's banner, sent at once on loopback) comes a
    round trip later at the soonest: the relay holds the connection's handshake round trip,
    then the banner's half of one."""
    machine = fleet.machines()[7]
    started = time.monotonic()
    with socket.create_connection((machine.address, machine.port), timeout=10) as connection:
        banner = connection.recv(64)
    elapsed = time.monotonic() - started
    assert banner.startswith(b"SSH-2.0-")
    assert elapsed >= ROUND_TRIP, f"a round trip through the relay in {elapsed:.3f} s"


def test_down_leaves_nothing_running(fleet: Fleet) -> None:
    pids = fleet.recorded_pids()
    assert len(pids) == 2 * len(MACHINES)  # a machine and a relay each
    completed = fleet.cli("down")
    assert completed.returncode == 0, completed.stderr
    assert [pid for pid in pids if _alive(pid)] == []
    for machine in fleet.machines():
        for address in ("127.0.0.1", machine.address):
            with socket.socket() as probe:
                assert probe.connect_ex((address, machine.port)) != 0, (machine.name, address)


def _relayed(fleet: Fleet, name: str) -> tuple[int, int, int]:
    """The relay's counts once the connections just closed are counted (it sees each close
    half a round trip after the client)."""
    paths = StatePaths(fleet.state).machine(name)
    deadline = time.monotonic() + 10
    while (counts := paths.relayed_bytes())[2] and time.monotonic() < deadline:
        time.sleep(0.05)
    return counts
