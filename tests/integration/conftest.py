"""The integration harness: a test fleet of its own, and deploys run the way users run them.

The fleet lives in .testbed-tests/ on its own ports, so a developer's fleet in .testbed/ keeps
running beside it. Tests that change the fleet's configuration work on a copy of the example
flake.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from flakefleet.fleet import load_fleet
from testbed.layout import StatePaths

ROOT = Path(__file__).resolve().parents[2]
STATE = Path(os.environ.get("FLAKEFLEET_TEST_STATE", ROOT / ".testbed-tests"))
PORT = os.environ.get("FLAKEFLEET_TEST_PORT", "22700")
BIN = Path(sys.executable).parent
DARWIN_NIX = "/nix/var/nix/profiles/default/bin"  # the only place a darwin machine has Nix


class Hidden:
    """A secret's bytes in a test: compared by content, shown only by length and digest, so a
    failing assertion does not print it into the test report."""

    __hash__ = None  # type: ignore[assignment]

    def __init__(self, content: bytes) -> None:
        self.content = content

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Hidden) and other.content == self.content

    def __repr__(self) -> str:
        digest = hashlib.sha256(self.content).hexdigest()[:12]
        return f"<secret: {len(self.content)} bytes, sha256 {digest}>"


@dataclass
class Deploy:
    """What one `pyinfra inventory.py deploy/...` run did."""

    returncode: int
    output: str
    report: dict[str, dict[str, Any]]

    def status(self, machine: str) -> str:
        return self.report[machine]["status"]


class Fleet:
    """The running test fleet, driven through its command line and plain ssh."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.fleet_file = state / "fleet.yaml"
        self.env = {
            **os.environ,
            "FLAKEFLEET_TESTBED_STATE": str(state),
            "FLAKEFLEET_TESTBED_PORT": PORT,
            "FLAKEFLEET_FLEET": str(self.fleet_file),
        }

    def testbed(self, *args: str) -> str:
        completed = subprocess.run(
            [sys.executable, "-m", "testbed", *args],
            cwd=ROOT, env=self.env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert completed.returncode == 0, completed.stderr
        return completed.stdout

    def ssh(self, machine: str, command: str, check: bool = True) -> str:
        """Run `command` on a machine (`name` or `user@name`) with Nix on its PATH, as in an
        interactive shell on a Mac (its profile adds Nix's); a deploy gets no such help."""
        command = f'PATH="$PATH:{DARWIN_NIX}"; {command}'
        completed = subprocess.run(
            ["ssh", "-F", str(self.state / "ssh_config"), machine, command],
            capture_output=True, text=True, check=False, timeout=60,
        )  # fmt: skip
        if check:
            assert completed.returncode == 0, f"{machine}: {command}: {completed.stderr}"
        return completed.stdout.strip()

    def deploy(
        self,
        flake: Path,
        *args: str,
        deploy_file: str = "deploy/site.py",
        fleet_file: Path | None = None,
    ) -> Deploy:
        """Run a deploy to the end, as a user would (with another fleet file if given)."""
        return self.finish(self.start(flake, *args, deploy_file=deploy_file, fleet_file=fleet_file))

    def start(
        self,
        flake: Path,
        *args: str,
        deploy_file: str = "deploy/site.py",
        fleet_file: Path | None = None,
    ) -> subprocess.Popen[str]:
        """Start a deploy in the background (for tests that act while it runs)."""
        descriptor, name = tempfile.mkstemp(prefix="report-", suffix=".json", dir=self.state)
        os.close(descriptor)
        report = Path(name)
        env = {**self.env, "FLAKEFLEET_REPORT": str(report)}
        if fleet_file is not None:
            env["FLAKEFLEET_FLEET"] = str(fleet_file)
        process = subprocess.Popen(
            [str(BIN / "pyinfra"), "-y", "inventory.py", deploy_file, "--data", f"flake={flake}",
             *args],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
            start_new_session=True,  # no terminal, even when pytest has one
        )  # fmt: skip
        process.report = report  # type: ignore[attr-defined]
        return process

    def finish(self, process: subprocess.Popen[str]) -> Deploy:
        output, _ = process.communicate(timeout=600)
        report: Path = process.report  # type: ignore[attr-defined]
        data = json.loads(report.read_text()) if report.stat().st_size else {}
        report.unlink()
        return Deploy(process.returncode, output, data)

    def wait_for(self, machine: str, command: str, timeout: float = 60) -> str:
        """Poll a command on a machine until it prints something; returns that."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            output = self.ssh(machine, command, check=False)
            if output:
                return output
            time.sleep(0.2)
        raise AssertionError(f"{machine}: {command!r} printed nothing within {timeout}s")

    def sessions(self, machine: str) -> int:
        """How many SSH sessions the machine's sshd has started so far (its console log)."""
        return StatePaths(self.state).machine(machine).ssh_sessions()

    def logins(self, machine: str) -> int:
        """How many SSH logins the machine's sshd has accepted so far (its console log)."""
        return StatePaths(self.state).machine(machine).ssh_logins()

    def consoles(self, lines: int = 15) -> str:
        """The last lines of every machine's console (what a machine that did not boot said)."""
        tails = []
        for log in sorted(self.state.glob("machines/*/console.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            tails.append(f"--- {log.parent.name}:\n" + "\n".join(tail))
        return "\n".join(tails)

    @property
    def machines(self) -> list[str]:
        return [machine.name for machine in load_fleet(self.fleet_file).machines]


@contextlib.contextmanager
def running_fleet(*up: str) -> Iterator[Fleet]:
    """A test fleet started with `testbed up *up`, purged afterwards: also when `up` failed
    half-way, which may leave some machines running."""
    testbed = Fleet(STATE)
    try:
        try:
            testbed.testbed("up", *up)
        except AssertionError as error:  # the purge below deletes the machines' consoles
            raise AssertionError(f"{error}\n{testbed.consoles()}") from None
        yield testbed
    finally:
        testbed.testbed("down", "--purge")


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    """A fresh test fleet for each test module (about a second to start), purged after it."""
    with running_fleet() as testbed:
        yield testbed


@pytest.fixture(scope="module")
def converged(fleet: Fleet, flake: Path) -> Fleet:
    """The module's fleet running what its flake gives each machine (the starting point of
    modules whose tests are not about the first deploy, which test_deploy.py checks)."""
    result = fleet.deploy(flake)
    assert result.returncode == 0, result.output
    return fleet


@pytest.fixture(scope="module")
def flake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the example flake that a test module may change."""
    copy = tmp_path_factory.mktemp("flake") / "example"
    shutil.copytree(ROOT / "example", copy)
    return copy


def set_host(flake: Path, machine: str, **settings: Any) -> None:
    """Change a machine's entry in the flake's hosts.json (None removes a setting)."""
    hosts_file = flake / "hosts.json"
    hosts = json.loads(hosts_file.read_text())
    for key, value in settings.items():
        if value is None:
            hosts[machine].pop(key, None)
        else:
            hosts[machine][key] = value
    hosts_file.write_text(json.dumps(hosts, indent=2))


# Where each machine class keeps its system in a flake, written out here independently of
# flakefleet's own table.
ATTRIBUTES = {
    "nixos": "nixosConfigurations.{name}.config.system.build.toplevel",
    "darwin": "darwinConfigurations.{name}.system",
    "home": 'homeConfigurations."{user}@{name}".activationPackage',
}
NIX = ["nix", "--extra-experimental-features", "nix-command flakes", "--option", "substituters", ""]


def evaluate(flake: Path, machine: str, env: dict[str, str] | None = None) -> str:
    """The system path the flake gives a machine, computed independently of flakefleet."""
    host = json.loads((flake / "hosts.json").read_text())[machine]
    attribute = ATTRIBUTES[host["class"]].format(name=machine, user=host.get("user", "root"))
    # As `nixos-rebuild --flake DIR` takes it: the files git tracks, or the whole directory.
    reference = f"git+file://{flake}" if (flake / ".git").exists() else f"path:{flake}"
    return subprocess.run(
        [*NIX, "eval", "--raw", f"{reference}#{attribute}.outPath"],
        capture_output=True, text=True, check=True, env=env,
    ).stdout  # fmt: skip


def sources_of(fleet: Fleet, name: str) -> str:
    """Where a machine keeps its sources (a home-manager user, without root, in its home)."""
    machine = next(m for m in load_fleet(fleet.fleet_file).machines if m.name == name)
    return f"~{machine.user}/.var/src" if machine.machine_class == "home" else "/var/src"


def profile_of(fleet: Fleet, name: str) -> tuple[str, str]:
    """The profile holding a machine's generations, and what links to the system it runs."""
    machine = next(m for m in load_fleet(fleet.fleet_file).machines if m.name == name)
    if machine.machine_class == "home":
        # Where home-manager's tool finds it: ~/.local/state/nix/profiles (Nix 2.14 and later),
        # else the per-user directory; a shell word, for scripts run as root.
        user = machine.user
        found = (
            f"$(d=~{user}/.local/state/nix/profiles; "
            f"[ -d $d ] || d=/nix/var/nix/profiles/per-user/{user}; echo $d)"
        )
        return f"{found}/home-manager", f"{found}/home-manager"
    return "/nix/var/nix/profiles/system", "/run/current-system"


# Real nixpkgs, home-manager and nix-darwin of 2020 (../shared/fixtures/README.md): they
# evaluate offline; nothing of them builds without the internet.
# (A checkout elsewhere than beside ../shared names the directory in FLAKEFLEET_FIXTURES.)
FIXTURES = Path(os.environ.get("FLAKEFLEET_FIXTURES") or ROOT.parent / "shared" / "fixtures")
REAL_NIX = FIXTURES / "real-nix-2020.tar.xz"
needs_real_nix = pytest.mark.skipif(
    not REAL_NIX.exists(),
    reason=f"needs {REAL_NIX} (real nixpkgs, home-manager and nix-darwin; absent here)",
)


def real_nix(directory: Path) -> Path:
    """Unpack the fixture under `directory` (outside the repository); the trees' directory."""
    with tarfile.open(REAL_NIX) as archive:
        archive.extractall(directory, filter="data")
    return directory / "real-nix-2020"


def locked_real_flake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """example-real, locked against the fixture's trees (unpacked outside the repository), as
    its flake.nix says; its github: inputs become the trees' path: ones in flake.lock."""
    trees = real_nix(tmp_path_factory.mktemp("real-nix"))
    flake = tmp_path_factory.mktemp("flake") / "example-real"
    shutil.copytree(ROOT / "example-real", flake)
    overrides = {"nixpkgs": "nixpkgs", "home-manager": "home-manager", "darwin": "nix-darwin"}
    flags = [
        f
        for name, tree in overrides.items()
        for f in ("--override-input", name, f"path:{trees / tree}")
    ]
    subprocess.run(
        [*NIX, "flake", "lock", f"path:{flake}", *flags], check=True, capture_output=True
    )
    return flake


def host_private_key(fleet: Fleet, machine: str) -> Path:
    """A test machine's own private SSH host key, from the test fleet's state: a namespace
    machine's sshd has a directory of its own, a systemd machine's is /etc/ssh in its root's
    layer."""
    found = [
        *fleet.state.glob(f"machines/{machine}/**/ssh/testbed/ssh_host_ed25519_key"),
        *fleet.state.glob(f"machines/{machine}/**/etc/ssh/ssh_host_ed25519_key"),
    ]
    assert len(found) == 1, found
    return found[0]


@contextlib.contextmanager
def fleet_of(flake: Path, *machines: str) -> Iterator[Fleet]:
    """A test fleet of only these machines of the flake (its hosts.json keeps only them)."""
    hosts = json.loads((flake / "hosts.json").read_text())
    (flake / "hosts.json").write_text(json.dumps({name: hosts[name] for name in machines}))
    with running_fleet("--roster", str(flake / "hosts.json")) as testbed:
        yield testbed
