"""Verification: the pytest-testinfra smoke suites of tests/smoke/, run from the controller."""

from __future__ import annotations

import os
import re
import sys
from typing import Any

from pyinfra.api import FunctionCommand, operation

from flakefleet import report
from flakefleet.process import run

SMOKE_SUITES = "tests/smoke"


@operation(is_idempotent=False)
def smoke_checks():
    """Run the smoke suites that match the machine's roles against it; fail it if any fails.

    Checks change nothing on the machine; they run on every deploy.
    """
    yield FunctionCommand(_run_smoke_checks, (), {})


def _run_smoke_checks(state: Any, host: Any) -> bool:
    fleet = os.environ.get("FLAKEFLEET_FLEET") or "fleet.yaml"
    completed = run(
        [
            sys.executable,
            "-m",
            "pytest",
            SMOKE_SUITES,
            "-q",
            "-p",
            "no:cacheprovider",
            "--fleet",
            fleet,
            "--machine",
            host.name,
        ],
        cwd=str(state.cwd or "."),
        check=False,
    )
    lines = [line for line in completed.stdout.splitlines() if line.strip()]
    verdict = re.sub(r"=+", "", lines[-1]).strip() if lines else "no output"
    if completed.returncode != 0:
        failures = [line for line in lines if line.startswith("FAILED")]
        report.failed(host.name, f"smoke checks: {(failures or [verdict])[0]}")
        return False
    report.note(host.name, f"smoke checks: {verdict}")
    return True
