"""Verification and the health gate: smoke suites and declared checks, then confirmation.

The pytest-testinfra smoke suites of tests/smoke/ run from the controller; the machines that
reach this step together are checked by up to `smoke_check_processes` pytest processes side
by side (checks not yet recorded are round trips one after another, so machines must not wait
for each other; one process start-up serves many machines, and one process alone when every
machine's checks are recorded: it sends all their batches at once), and each machine passes
or fails on its own tests. Machines none of whose kin is recorded yet (a first deploy) are
checked in two rounds: one machine of each kin, then the others, batched from their records.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyinfra import host
from pyinfra.api import FunctionCommand, operation

from flakefleet import checks, prefetch
from flakefleet.process import run_fed
from flakefleet.run import Run
from flakefleet.settings import CheckFailure
from operations import activation

SMOKE_SUITES = "tests/smoke"
SMOKE_TIMEOUT = 600  # seconds for all machines' suites; a hung check must not hang the deploy
BATCH_TIMEOUT = 120  # seconds for a batch on the deploy's connection (then pytest's own try)


# A check that did not run is not a pass: a machine none of whose checks reported fails.
NO_RESULT = "no smoke-check result came back for this machine"


@dataclass
class Verdict:
    """One machine's smoke-check results: passes, skips a suite declared acceptable
    (`skips_acceptable = True`), and failures (failed, errored or skipped otherwise)."""

    counts: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return f"{self.counts['passed']} passed, {self.counts['skipped']} skipped"


@operation(is_idempotent=False)
def health_gate(on_failure: CheckFailure = CheckFailure.ROLLBACK):
    """Check the machine (smoke suites for its roles, and the `checks` in its data), then
    confirm its pending activation, or roll it back when a check fails.

    + on_failure: what a failed check does to a machine that was just activated:
      ``rollback`` it, ``keep`` the new system (the machine is still reported failed), or
      ``stop`` (roll back and activate no further machine in this run)

    Checks change nothing on the machine; they run on every deploy.
    """
    yield FunctionCommand(_gate, (host.current_op_hash, on_failure), {})


def _gate(state: Any, host: Any, op_hash: str, on_failure: CheckFailure) -> bool:
    run = Run.of(state)
    outcome = run.outcome(host.name)
    if host.name in run.awaiting_reboot:  # the old system still runs: checked after a reboot
        outcome.note("health checks: not run, the new system runs after a reboot")
        return True
    if not checked(run, host.name):
        outcome.note("health checks: not run, this run changed nothing (check_unchanged = False)")
        return True
    with run.lock:
        if (op_hash, host.name) not in run.verdicts:
            machines = [
                h.name
                for h in state.inventory.get_active_hosts()
                if op_hash in state.ops[h] and checked(run, h.name)
            ]
            for name, verdict in check_machines(run, machines).items():
                run.verdicts[op_hash, name] = verdict
    verdict = run.verdicts[op_hash, host.name]
    failures = verdict.failures + checks.run_checks(run, host.name)
    if not failures:
        outcome.note(f"smoke checks: {verdict.summary()}")
        if host.name in run.pending:
            confirmed, message = activation.confirm(run, host.name)
            if not confirmed:
                outcome.fail(f"activation: {message}")
                return False
        return True

    reason = f"checks failed: {', '.join(failures)}"
    if host.name not in run.pending and run.settings(host.name).confirm_timeout == 0:
        # Nothing waits for a confirmation: the new system stays, reachable or not.
        reason += "; not rolled back: with confirm_timeout = 0 the new system stays"
    if host.name in run.pending:
        if on_failure is CheckFailure.KEEP:
            _confirmed, message = activation.confirm(run, host.name)
            reason += f"; kept the new system ({message})"
        else:
            aborted = activation.abort(run, host.name, reason)
            reason = aborted if aborted.startswith(reason) else f"{reason}; {aborted}"
            if on_failure is CheckFailure.STOP:
                run.stopped.append(f"{host.name} failed its checks")
    outcome.fail(reason)
    return False


def expected(run: Run, machines: list[str]) -> list[tuple[str, str]]:
    """The system each machine should run now, as this run decided it."""
    systems = [(name, run.outcome(name).system) for name in machines]
    return [(name, system) for name, system in systems if system]


def unchanged(run: Run, name: str) -> bool:
    """Whether this run changed nothing on the machine (nothing awaits its confirmation)."""
    return not run.outcome(name).changed and name not in run.pending


def checked(run: Run, name: str) -> bool:
    """Whether the health gate checks the machine: always, unless its `check_unchanged` is
    False and this run changed nothing on it."""
    return run.settings(name).check_unchanged or not unchanged(run, name)


def check_machines(run: Run, machines: list[str]) -> dict[str, Verdict]:
    """The smoke suites' verdicts on machines: first one machine of each kin none of whose
    checks are recorded (its commands go one by one), then the rest, whose checks are then
    batched from their own records or their kin's (flakefleet.prefetch)."""
    most = run.settings(machines[0]).smoke_check_processes if machines else 1
    first = prefetch.unpredicted(run.check_records, run.fleet, machines)
    verdicts = run_smoke_checks(run, first, most) if first else {}
    rest = [name for name in machines if name not in verdicts]
    if rest:
        processes = prefetch.processes_for(run.check_records, run.fleet, rest, most)
        verdicts |= run_smoke_checks(run, rest, processes)
    return verdicts


def run_smoke_checks(run: Run, machines: list[str], processes: int = 1) -> dict[str, Verdict]:
    """Run the smoke suites against machines, in up to `processes` pytest processes at once,
    each with its share of the machines; a verdict per machine."""
    shares = [machines[start::processes] for start in range(min(processes, len(machines)))]
    verdicts: dict[str, Verdict] = {}
    with ThreadPoolExecutor(max_workers=max(1, len(shares))) as pool:
        for share in pool.map(lambda share: _run_pytest(run, share), shares):
            verdicts.update(share)
    return verdicts


def _run_pytest(session: Run, machines: list[str]) -> dict[str, Verdict]:
    """Run the smoke suites against machines in one pytest process; a verdict per machine."""
    fleet, cwd = str(session.fleet_file), session.cwd
    with tempfile.TemporaryDirectory(prefix="flakefleet-smoke-") as scratch:
        junit = Path(scratch) / "junit.xml"
        verdicts = {name: Verdict() for name in machines}
        argv = [
            sys.executable, "-m", "pytest", SMOKE_SUITES, "-q", "-p", "no:cacheprovider",
            "--fleet", fleet, f"--junitxml={junit}",
            *(f"--machine={name}" for name in machines),
            *(f"--expect-system={name}={system}" for name, system in expected(session, machines)),
        ]  # fmt: skip
        try:
            completed = run_fed(
                lambda descriptor: [*argv, f"--batches-fd={descriptor}"],
                lambda: batches_over_held_connections(session, machines),
                cwd=str(cwd),
                timeout=SMOKE_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            for verdict in verdicts.values():
                verdict.failures.append(f"smoke checks did not finish within {SMOKE_TIMEOUT}s")
            return verdicts
        if not junit.exists():
            reason = (completed.stderr or completed.stdout).strip().splitlines()[-1:] or ["?"]
            for verdict in verdicts.values():
                verdict.failures.append(f"pytest did not run: {reason[0]}")
            return verdicts
        if completed.returncode not in (0, 1, 5):  # 5: nothing collected (no result, below)
            for verdict in verdicts.values():
                verdict.failures.append(f"pytest exited {completed.returncode}")
        for case in ElementTree.parse(junit).iter("testcase"):
            match = re.search(r"\[(.+)\]$", case.get("name", ""))
            if not match or match.group(1) not in verdicts:
                # A collection error belongs to no machine: every machine's checks are in doubt.
                if any(case.find(kind) is not None for kind in ("failure", "error")):
                    where = case.get("classname") or case.get("name") or "?"
                    for verdict in verdicts.values():
                        verdict.failures.append(f"{where} (error outside any machine's checks)")
                continue
            verdict = verdicts[match.group(1)]
            test = case.get("name", "?").split("[")[0]
            if case.find("failure") is not None or case.find("error") is not None:
                verdict.counts["failed"] += 1
                verdict.failures.append(test)
            elif (skipped := case.find("skipped")) is not None:
                if _property(case, "skips") == "acceptable":
                    verdict.counts["skipped"] += 1
                else:
                    verdict.counts["failed"] += 1
                    verdict.failures.append(f"{test} (skipped: {skipped.get('message', '?')})")
            else:
                verdict.counts["passed"] += 1
        for verdict in verdicts.values():
            if not verdict.counts and not verdict.failures:
                verdict.failures.append(NO_RESULT)
    return verdicts


def batches_over_held_connections(run: Run, machines: list[str]) -> bytes:
    """The batch of each unchanged machine's recorded (or its kin's) check commands, run over
    the connection the deploy holds, all machines at once, while pytest starts: what the smoke
    suites' conftest takes (`--batches-fd`) instead of logging in to send them.

    A machine this run changed is left to the checks themselves, which log in anew: a new
    system (or new keys) that breaks SSH logins leaves a connection opened before it working,
    so only a new login proves logins still work (with `confirm_timeout = 0`, no confirmation
    tries one). So is a machine with nothing recorded, or whose batch got no answer."""

    def send(name: str) -> tuple[str, dict[str, Any]] | None:
        commands = prefetch.expected(run.check_records, run.fleet, name)
        if not commands or not unchanged(run, name):
            return None
        host = run.state.inventory.get_host(name)
        script = prefetch.batch_script(commands, armored=True)
        try:
            succeeded, output = run.target(name).run_as_login(host, script, BATCH_TIMEOUT)
        except Exception:  # a connection pyinfra lost, or a hung batch: the checks' own try
            return None
        return (name, {"commands": commands, "output": output.stdout}) if succeeded else None

    with ThreadPoolExecutor(max_workers=max(1, len(machines))) as pool:
        answers = dict(found for found in pool.map(send, machines) if found)
    return json.dumps(answers).encode()


def _property(case: ElementTree.Element, name: str) -> str | None:
    """A property the smoke suites' conftest recorded on a test case."""
    for prop in case.iter("property"):
        if prop.get("name") == name:
            return prop.get("value")
    return None
