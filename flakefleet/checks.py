"""Declared health checks, from a machine's `checks` data:

    checks = [
        {"command": "test -S /run/postgresql/.s.PGSQL.5432", "timeout": 10},  # on the machine
        {"http": "http://web1.example.org/health", "status": 200, "timeout": 5},  # from here
    ]

A check that fails is described in a few words; the health gate reports them.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flakefleet.target import Target, Unreachable

if TYPE_CHECKING:
    from flakefleet.run import Run

TIMEOUT = 10  # seconds a check waits when it does not say (the smoke suites' too)


def run_checks(run: Run, name: str) -> list[str]:
    """Run every declared check of a machine; returns the failures (empty when all pass)."""
    failures = []
    for check in run.settings(name).checks:
        problem = _run(run.target(name), check)
        if problem:
            failures.append(problem)
    return failures


def _run(target: Target, check: Mapping[str, Any]) -> str | None:
    timeout = float(check.get("timeout", TIMEOUT))
    if "command" in check:
        try:
            completed = target.run(str(check["command"]), timeout=timeout)
        except Unreachable as error:
            return f"command {check['command']!r}: {error}"
        if completed.returncode != 0:
            return f"command {check['command']!r} exited {completed.returncode}"
        return None
    if "http" in check:
        url, expected = str(check["http"]), int(check.get("status", 200))
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                status = response.status
        except urllib.error.HTTPError as error:
            status = error.code
        except (urllib.error.URLError, OSError) as error:
            return f"GET {url}: {getattr(error, 'reason', error)}"
        return None if status == expected else f"GET {url}: status {status}, expected {expected}"
    return f"check {dict(check)!r} has neither 'command' nor 'http'"
