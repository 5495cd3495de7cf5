"""The health gate's smoke-check verdicts on the test fleet: a check that errors, a check that
was skipped without its suite saying skips are acceptable, and a machine no result came back
for all fail the machine; acceptable skips are counted, not passed off as passes.

The smoke suites are the repository's own; a small pytest plugin, loaded into the deploy's
smoke-check process through PYTEST_ADDOPTS, makes web1's checks error, skip or vanish. One
machine, in order, on one fleet.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Fleet, evaluate, running_fleet
from test_deploy import remote_state

MACHINE = "web1"
# web1 (role web) gets test_system.py (4 checks), test_services.py (1, declares its skips
# acceptable), test_units.py (1: web1 has systemd) and test_web.py (1).
CHECKS = 7

PROBE = """
import pytest

@pytest.fixture(autouse=True)
def _probe(request):
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or callspec.params.get("machine") != {machine!r}:
        return
    if {only!r} and request.node.originalname != {only!r}:
        return
    {action}
"""


@pytest.fixture(scope="module")
def fleet(flake: Path) -> Iterator[Fleet]:
    hosts = json.loads((flake / "hosts.json").read_text())
    (flake / "hosts.json").write_text(json.dumps({MACHINE: hosts[MACHINE]}))
    with running_fleet("--roster", str(flake / "hosts.json")) as testbed:
        yield testbed


@contextlib.contextmanager
def probe(fleet: Fleet, directory: Path, action: str, only: str = "") -> Iterator[None]:
    """Deploys in this block run their smoke checks with a plugin doing `action` in web1's
    checks (or in its check `only`)."""
    plugin = directory / "smoke_probe.py"
    plugin.write_text(PROBE.format(machine=MACHINE, only=only, action=action))
    with extra_env(fleet, PYTEST_ADDOPTS="-p smoke_probe", PYTHONPATH=str(directory)):
        yield


@contextlib.contextmanager
def extra_env(fleet: Fleet, **variables: str) -> Iterator[None]:
    saved = dict(fleet.env)
    for name, value in variables.items():
        # PYTHONPATH may already name the code under test (tests/mutations.py sets it).
        previous = fleet.env.get(name) if name == "PYTHONPATH" else None
        fleet.env[name] = f"{value}{os.pathsep}{previous}" if previous else value
    try:
        yield
    finally:
        fleet.env.clear()
        fleet.env.update(saved)


def smoke_note(notes: list[str]) -> str:
    found = [note for note in notes if note.startswith("smoke checks:")]
    assert len(found) == 1, notes
    return found[0]


def test_passes_are_counted(fleet, flake):
    result = fleet.deploy(flake)
    assert result.returncode == 0, result.output
    assert remote_state(fleet, MACHINE)["current"] == evaluate(flake, MACHINE)
    note = smoke_note(result.report[MACHINE]["notes"])
    assert note == f"smoke checks: {CHECKS} passed, 0 skipped"


def test_a_check_that_errors_fails_the_machine(fleet, flake, tmp_path):
    with probe(fleet, tmp_path, "raise RuntimeError('a fixture that raises')"):
        result = fleet.deploy(flake)
    assert result.returncode != 0
    assert result.status(MACHINE) == "failed"
    error = result.report[MACHINE]["error"]
    assert error.startswith("checks failed: "), error
    assert "test_runs_the_expected_system" in error and "test_page_is_this_machines" in error


def test_an_undeclared_skip_fails_the_machine(fleet, flake, tmp_path):
    with probe(fleet, tmp_path, "pytest.skip('probe')", only="test_page_is_this_machines"):
        result = fleet.deploy(flake)
    assert result.returncode != 0
    assert result.report[MACHINE]["error"] == (
        "checks failed: test_page_is_this_machines (skipped: probe)"
    )


def test_a_skip_its_suite_declares_acceptable_is_counted_not_passed(fleet, flake, tmp_path):
    with probe(fleet, tmp_path, "pytest.skip('probe')", only="test_service_answers"):
        result = fleet.deploy(flake)
    assert result.returncode == 0, result.output
    assert smoke_note(result.report[MACHINE]["notes"]) == (
        f"smoke checks: {CHECKS - 1} passed, 1 skipped"
    )
    assert f"{CHECKS - 1} passed, 1 skipped" in result.output.split("flakefleet summary")[-1]


def test_a_machine_with_no_result_fails(fleet, flake):
    with extra_env(fleet, PYTEST_ADDOPTS=f"-k 'not {MACHINE}'"):  # deselects all its checks
        result = fleet.deploy(flake)
    assert result.returncode != 0
    assert result.report[MACHINE]["error"] == (
        "checks failed: no smoke-check result came back for this machine"
    )
