"""Verification: the pytest-testinfra smoke suites of tests/smoke/, run from the controller.

All machines that reach this step together are checked by one pytest process (one start-up
instead of one per machine); each machine then passes or fails on its own tests.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import threading
import xml.etree.ElementTree as ElementTree
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyinfra import host
from pyinfra.api import FunctionCommand, operation

from flakefleet import report
from flakefleet.process import run

SMOKE_SUITES = "tests/smoke"


@dataclass
class Verdict:
    """One machine's smoke-check results."""

    counts: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return ", ".join(f"{n} {outcome}" for outcome, n in sorted(self.counts.items()))


@operation(is_idempotent=False)
def smoke_checks():
    """Run the smoke suites that match the machine's roles against it; fail it if any fails.

    Checks change nothing on the machine; they run on every deploy.
    """
    yield FunctionCommand(_check, (host.current_op_hash,), {})


_lock = threading.Lock()
_verdicts: dict[tuple[str, str], Verdict] = {}


def _check(state: Any, host: Any, op_hash: str) -> bool:
    with _lock:
        if (op_hash, host.name) not in _verdicts:
            machines = [
                h.name for h in state.inventory.get_active_hosts() if op_hash in state.ops[h]
            ]
            for name, verdict in run_smoke_checks(machines, Path(state.cwd or ".")).items():
                _verdicts[op_hash, name] = verdict
    verdict = _verdicts[op_hash, host.name]
    if verdict.failures:
        report.failed(host.name, f"smoke checks failed: {', '.join(verdict.failures)}")
        return False
    report.note(host.name, f"smoke checks: {verdict.summary()}")
    return True


def run_smoke_checks(machines: list[str], cwd: Path) -> dict[str, Verdict]:
    """Run the smoke suites against machines in one pytest process; a verdict per machine."""
    fleet = os.environ.get("FLAKEFLEET_FLEET") or "fleet.yaml"
    with tempfile.TemporaryDirectory(prefix="flakefleet-smoke-") as scratch:
        junit = Path(scratch) / "junit.xml"
        completed = run(
            [
                sys.executable, "-m", "pytest", SMOKE_SUITES, "-q", "-p", "no:cacheprovider",
                "--fleet", fleet, f"--junitxml={junit}",
                *(f"--machine={name}" for name in machines),
            ],
            cwd=str(cwd),
            check=False,
        )  # fmt: skip
        verdicts = {name: Verdict() for name in machines}
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
