"""Verification and the health gate: smoke suites and declared checks, then confirmation.

The pytest-testinfra smoke suites of tests/smoke/ run from the controller; the machines that
reach this step together are checked by up to `smoke_check_processes` pytest processes side
by side (one machine's checks are round trips one after another, so machines must not wait
for each other; one process start-up serves many machines), and each machine passes or fails
on its own tests.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import threading
import xml.etree.ElementTree as ElementTree
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyinfra import host
from pyinfra.api import FunctionCommand, operation

from flakefleet import checks, report
from flakefleet.fleet import fleet_file
from flakefleet.process import run
from flakefleet.settings import CHECK_FAILURE_POLICIES
from operations import activation

SMOKE_SUITES = "tests/smoke"
SMOKE_TIMEOUT = 600  # seconds for all machines' suites; a hung check must not hang the deploy


@dataclass
class Verdict:
    """One machine's smoke-check results."""

    counts: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return ", ".join(f"{n} {outcome}" for outcome, n in sorted(self.counts.items()))


@operation(is_idempotent=False)
def health_gate(on_failure: str = "rollback"):
    """Check the machine (smoke suites for its roles, and the `checks` in its data), then
    confirm its pending activation, or roll it back when a check fails.

    + on_failure: what a failed check does to a machine that was just activated:
      ``rollback`` it, ``keep`` the new system (the machine is still reported failed), or
      ``stop`` (roll back and activate no further machine in this run)

    Checks change nothing on the machine; they run on every deploy.
    """
    if on_failure not in CHECK_FAILURE_POLICIES:
        choices = ", ".join(CHECK_FAILURE_POLICIES)
        yield report.stop(f"health gate: on_check_failure must be one of {choices}")
        return
    yield FunctionCommand(_gate, (host.current_op_hash, on_failure), {})


_lock = threading.Lock()
_verdicts: dict[tuple[str, str], Verdict] = {}


def _gate(state: Any, host: Any, op_hash: str, on_failure: str) -> bool:
    if activation.awaiting_reboot(host.name):  # the old system still runs: check after a reboot
        report.note(host.name, "health checks: not run, the new system runs after a reboot")
        return True
    with _lock:
        if (op_hash, host.name) not in _verdicts:
            machines = [
                h.name for h in state.inventory.get_active_hosts() if op_hash in state.ops[h]
            ]
            processes = host.data.get("smoke_check_processes", 4)
            cwd = Path(state.cwd or ".")
            for name, verdict in run_smoke_checks(machines, cwd, processes).items():
                _verdicts[op_hash, name] = verdict
    verdict = _verdicts[op_hash, host.name]
    failures = verdict.failures + checks.run_checks(host.name, host.data)
    if not failures:
        report.note(host.name, f"smoke checks: {verdict.summary()}")
        if activation.pending(host.name):
            confirmed, message = activation.confirm(host)
            if not confirmed:
                report.failed(host.name, f"activation: {message}")
                return False
        return True

    reason = f"checks failed: {', '.join(failures)}"
    if activation.pending(host.name):
        if on_failure == "keep":
            _confirmed, message = activation.confirm(host)
            reason += f"; kept the new system ({message})"
        else:
            outcome = activation.abort(host, reason)
            reason = outcome if outcome.startswith(reason) else f"{reason}; {outcome}"
            if on_failure == "stop":
                activation.stop_rollout(f"{host.name} failed its checks")
    report.failed(host.name, reason)
    return False


def expected(machines: list[str]) -> list[tuple[str, str]]:
    """The system each machine should run now, as this run decided it."""
    systems = [(name, report.outcome(name).system) for name in machines]
    return [(name, system) for name, system in systems if system]


def run_smoke_checks(machines: list[str], cwd: Path, processes: int = 1) -> dict[str, Verdict]:
    """Run the smoke suites against machines, in up to `processes` pytest processes at once,
    each with its share of the machines; a verdict per machine."""
    shares = [machines[start::processes] for start in range(min(processes, len(machines)))]
    verdicts: dict[str, Verdict] = {}
    with ThreadPoolExecutor(max_workers=max(1, len(shares))) as pool:
        for share in pool.map(lambda share: _run_pytest(share, cwd), shares):
            verdicts.update(share)
    return verdicts


def _run_pytest(machines: list[str], cwd: Path) -> dict[str, Verdict]:
    """Run the smoke suites against machines in one pytest process; a verdict per machine."""
    fleet = str(fleet_file())
    with tempfile.TemporaryDirectory(prefix="flakefleet-smoke-") as scratch:
        junit = Path(scratch) / "junit.xml"
        verdicts = {name: Verdict() for name in machines}
        argv = [
            sys.executable, "-m", "pytest", SMOKE_SUITES, "-q", "-p", "no:cacheprovider",
            "--fleet", fleet, f"--junitxml={junit}",
            *(f"--machine={name}" for name in machines),
            *(f"--expect-system={name}={system}" for name, system in expected(machines)),
        ]  # fmt: skip
        try:
            completed = run(argv, cwd=str(cwd), check=False, timeout=SMOKE_TIMEOUT)
        except subprocess.TimeoutExpired:
            for verdict in verdicts.values():
                verdict.failures.append(f"smoke checks did not finish within {SMOKE_TIMEOUT}s")
            return verdicts
        if not junit.exists():
            reason = (completed.stderr or completed.stdout).strip().splitlines()[-1:] or ["?"]
            for verdict in verdicts.values():
                verdict.failures.append(f"pytest did not run: {reason[0]}")
            return verdicts
        for case in ElementTree.parse(junit).iter("testcase"):
            match = re.search(r"\[(.+)\]$", case.get("name", ""))
            if not match or match.group(1) not in verdicts:
                continue
            verdict = verdicts[match.group(1)]
            if case.find("failure") is not None or case.find("error") is not None:
                verdict.counts["failed"] += 1
                verdict.failures.append(case.get("name", "?").split("[")[0])
            elif case.find("skipped") is not None:
                verdict.counts["skipped"] += 1
            else:
                verdict.counts["passed"] += 1
    return verdicts
