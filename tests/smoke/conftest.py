"""Smoke checks run against fleet machines with pytest-testinfra, over OpenSSH with the
fleet's own host keys (strict checking), after a rollout or on their own:

    pytest tests/smoke --fleet .testbed/fleet.yaml [--machine web1 ...] [--role web ...]

A suite declares the roles it is for with a module-level ``roles = {...}`` and the machine
classes with ``classes = {...}``; it runs against every selected machine that matches (a suite
without them runs on every machine).

A skipped check is not a pass: a deploy fails the machine, unless the suite declares that its
skips are acceptable with ``skips_acceptable = True`` (e.g. a check for a setting the machine
may lack); the deploy's summary counts those skips.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import testinfra
from gevent import monkey
from pyinfra.api import Inventory, State
from pyinfra.context import ctx_state

from flakefleet.fleet import Fleet, Machine, load_fleet
from flakefleet.prefetch import Prefetch, expected, records
from flakefleet.target import KEEPALIVE, Target

# pyinfra_cli patches the standard library for gevent when imported, which the checks do not
# need and which makes each fork of this process cost 20 to 140 ms (the checks start an ssh a
# machine, and testinfra one a command): its inventory loader is imported with that held off.
_patch_all, monkey.patch_all = monkey.patch_all, lambda *args, **kwargs: None
try:
    from pyinfra_cli.inventory import make_inventory
finally:
    monkey.patch_all = _patch_all

PROJECT = Path(__file__).resolve().parents[2]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("flakefleet")
    group.addoption("--fleet", default=os.environ.get("FLAKEFLEET_FLEET") or "fleet.yaml")
    group.addoption("--machine", action="append", default=[], help="check only these machines")
    group.addoption("--role", action="append", default=[], help="check only machines with a role")
    group.addoption(
        "--expect-system",
        action="append",
        default=[],
        metavar="MACHINE=PATH",
        help="the system a machine should run (the deploy passes what it deployed)",
    )
    group.addoption(
        "--batches-fd",
        type=int,
        metavar="FD",
        help="read the machines' batches, sent for them, from this descriptor (the deploy's)",
    )


FLEET = pytest.StashKey[Fleet]()


def _fleet(config: pytest.Config) -> Fleet:
    """The fleet file, read once a session (collection asks for it once a test function)."""
    if FLEET not in config.stash:
        config.stash[FLEET] = load_fleet(Path(config.getoption("fleet")))
    return config.stash[FLEET]


def _selected(config: pytest.Config) -> list[Machine]:
    fleet = _fleet(config)
    names = set(config.getoption("machine"))
    roles = set(config.getoption("role"))
    return [
        machine
        for machine in fleet.machines
        if (not names or machine.name in names) and (not roles or roles & set(machine.groups))
    ]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "machine" not in metafunc.fixturenames:
        return
    machines = _selected(metafunc.config)
    wanted = getattr(metafunc.module, "roles", None)
    if wanted is not None:
        machines = [machine for machine in machines if set(wanted) & set(machine.roles)]
    classes = getattr(metafunc.module, "classes", None)
    if classes is not None:
        machines = [machine for machine in machines if machine.machine_class in classes]
    metafunc.parametrize(
        "machine",
        [machine.name for machine in machines],
        ids=[machine.name for machine in machines],
        indirect=True,
        scope="module",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Recorded in the JUnit report the deploy reads (operations/verify.py).
    for item in items:
        module = getattr(item, "module", None)
        if getattr(module, "skips_acceptable", False):
            item.user_properties.append(("skips", "acceptable"))


@pytest.fixture(scope="session")
def inventory(request: pytest.FixtureRequest) -> Inventory:
    """The fleet as the deploy sees it: `inventory.py` over the fleet file, with group_data/."""
    os.environ["FLAKEFLEET_FLEET"] = str(Path(request.config.getoption("fleet")).resolve())
    with ctx_state.use(State()):  # pyinfra reads inventory files inside a run's state
        return make_inventory(str(PROJECT / "inventory.py"), cwd=str(PROJECT))


@pytest.fixture(scope="module")
def machine(request: pytest.FixtureRequest, inventory: Inventory) -> dict[str, Any]:
    """The machine's pyinfra host data (e.g. `remote_nix_dir` from group_data), with its name."""
    return {"name": request.param, **inventory.get_host(request.param).data.dict()}


@pytest.fixture(scope="module")
def expected_system(request: pytest.FixtureRequest, machine: dict[str, Any]) -> str | None:
    """The system the machine should run, when the caller said (`--expect-system`)."""
    expected = dict(item.split("=", 1) for item in request.config.getoption("expect_system"))
    return expected.get(machine["name"])


@pytest.fixture(scope="session")
def _control_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One multiplexed OpenSSH connection per machine, closed when the session ends."""
    directory = Path(tempfile.mkdtemp(prefix="flakefleet-ssh-"))
    yield directory
    for socket in directory.iterdir():
        subprocess.run(
            ["ssh", "-o", f"ControlPath={socket}", "-O", "exit", "machine"],
            capture_output=True,
            check=False,
        )
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def _records(request: pytest.FixtureRequest) -> Path:
    """Where the fleet file's machines' check commands are recorded (the deploy runs the checks
    in the repository)."""
    return records(Path(request.config.getoption("fleet")))


@pytest.fixture(scope="session")
def _batches(_records: Path) -> Iterator[dict[str, Prefetch]]:
    """Each machine's check commands, batched (``flakefleet.prefetch``); recorded at the end
    for the next run."""
    batches: dict[str, Prefetch] = {}
    yield batches
    for name, batch in batches.items():
        batch.record(_records, name)


@pytest.fixture(scope="session")
def _hosts(
    request: pytest.FixtureRequest,
    inventory: Inventory,
    _control_dir: Path,
    _batches: dict[str, Prefetch],
    _records: Path,
) -> dict[str, Any]:
    """Every selected machine's testinfra host, with the batches recorded for them sent all at
    once before the first check (the machines' round trips overlap instead of adding up), or
    taken from the deploy, which sent them over its own connections (`--batches-fd`)."""
    descriptor = request.config.getoption("batches_fd")
    if descriptor is not None:  # batches the deploy sent over its own connections meanwhile
        with os.fdopen(descriptor, "rb") as pipe:
            text = pipe.read()
        try:
            sent = json.loads(text)
        except ValueError:  # cut short: the checks send their own
            sent = {}
        for name, answer in sent.items():
            _batches[name] = Prefetch(answer["commands"])
            _batches[name].take((0, answer["output"].encode(), b""), armored=True)

    hosts = {}
    fleet = _fleet(request.config)
    for selected in _selected(request.config):
        data = {"name": selected.name, **inventory.get_host(selected.name).data.dict()}
        hosts[selected.name] = _connect(data, _control_dir, _batches, _records, fleet)

    # Every batch's ssh started first, then each one's answer read: they all run meanwhile.
    started = {}
    for name, found in hosts.items():
        script = _batches[name].script()
        if script is not None:
            started[name] = _start_ssh(found.backend, script)
    for name, process in started.items():
        stdout, stderr = process.communicate()
        _batches[name].take((process.returncode, stdout, stderr))
    return hosts


def _start_ssh(backend: Any, script: str) -> subprocess.Popen[bytes]:
    """`script` sent as the testinfra backend sends a command (its ssh command line, shared
    connection included), started and not waited for."""
    ssh, arguments = backend._build_ssh_command(script)
    command = backend.encode(backend.quote(" ".join(ssh), *arguments))
    return subprocess.Popen(
        command,
        shell=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.fixture(scope="module")
def host(machine: dict[str, Any], _hosts: dict[str, Any]) -> Any:
    """A testinfra host reached with the same address, key and known_hosts as the deploy; its
    commands go through the machine's batch (one round trip for those asked last run)."""
    return _hosts[machine["name"]]


def _connect(
    machine: dict[str, Any],
    control_dir: Path,
    batches: dict[str, Prefetch],
    records: Path,
    fleet: Fleet,
) -> Any:
    name = machine["name"]
    options = [
        *Target.from_data(name, machine).ssh_options(),
        *KEEPALIVE,  # a machine that dies mid-check fails its checks, not hangs them
        "-o", "ControlMaster=auto",
        "-o", f"ControlPath={control_dir / name}",
        "-o", "ControlPersist=60",
    ]  # fmt: skip
    found = testinfra.get_host(
        f"ssh://{machine['ssh_user']}@{machine['ssh_hostname']}",
        ssh_extra_args=shlex.join(options),
    )
    if name not in batches:
        batches[name] = Prefetch(expected(records, fleet, name))  # or a kin's: a new machine
    _through(found.backend, batches[name])
    return found


def _through(backend: Any, batch: Prefetch) -> None:
    """Send the backend's commands through `batch` (once: testinfra reuses its hosts)."""
    if getattr(backend, "flakefleet_batch", None) is batch:
        return
    send_alone = backend.run_ssh
    if hasattr(backend, "flakefleet_batch"):
        send_alone = backend.flakefleet_send_alone

    def send(script: str) -> tuple[int, bytes, bytes]:
        result = send_alone(script)
        return result.rc, result.stdout_bytes, result.stderr_bytes

    def run_ssh(command: str) -> Any:
        status, stdout, stderr = batch.answer(command, send)
        return backend.result(status, backend.encode(command), stdout, stderr)

    backend.flakefleet_send_alone = send_alone
    backend.flakefleet_batch = batch
    backend.run_ssh = run_ssh
