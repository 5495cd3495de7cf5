"""The run summary: one line per machine saying what happened to it and, on failure, why.

Operations record what they changed and why they failed in the run's `Report`; the summary is
printed when the run closes (after pyinfra's own results), and written as JSON to
$FLAKEFLEET_REPORT when that is set.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Outcome:
    """What a deploy did to one machine."""

    machine: str
    goal: str = ""
    changed: list[str] = field(default_factory=list)
    system: str | None = None
    derivation: str | None = None  # the system's, as evaluated
    running: str | None = None  # the system the machine ran when the run read it
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    plan: list[str] = field(default_factory=list)  # deploy/plan.py: what a deploy would do
    state: dict[str, Any] = field(default_factory=dict)  # deploy/status.py: where it stands
    skipped: bool = False  # not activated: the rollout stopped before its wave
    ssh_logins: int = 0  # new SSH connections the deploy made to it (rsync, Nix, workers)
    commands: int = 0  # commands it ran there, on those and on pyinfra's connection
    check_commands: int = 0  # the smoke checks' batches it sent on pyinfra's connection

    @property
    def status(self) -> str:
        if self.error:
            return "skipped" if self.skipped else "failed"
        return "changed" if self.changed else "unchanged"

    def changed_by(self, what: str) -> None:
        """Record that a step changed the machine (e.g. 'sources', 'closure', 'switch')."""
        if what not in self.changed:
            self.changed.append(what)

    def fail(self, reason: str) -> None:
        """Record why the machine failed; the first reason is the one that counts."""
        if self.error is None:
            self.error = reason

    def skip(self, reason: str) -> None:
        """Record that the machine was left as it was, and why (a stopped rollout)."""
        if self.error is None:
            self.error, self.skipped = reason, True

    def note(self, text: str) -> None:
        self.notes.append(text)


class Report:
    """Every machine's outcome in one run."""

    def __init__(self) -> None:
        self.outcomes: dict[str, Outcome] = {}
        self._lock = threading.Lock()

    def __call__(self, machine: str) -> Outcome:
        """The outcome record of a machine, created on first use."""
        with self._lock:
            return self.outcomes.setdefault(machine, Outcome(machine))

    def explain_failures(self, state: Any, addresses: Mapping[str, str]) -> None:
        """Give failed machines without a recorded reason the failing operation and its
        output (`addresses`: where each machine was reached, `address:port`)."""
        for host in state.inventory:
            if host not in state.failed_hosts or self(host.name).error:
                continue
            if host not in state.activated_hosts:
                where = addresses.get(host.name, host.name)
                self(host.name).fail(f"unreachable: could not connect over SSH to {where}")
                continue
            for op_hash in state.get_op_order():
                op_data = state.ops[host].get(op_hash)
                meta = op_data.operation_meta if op_data else None
                if meta is None or not meta.is_complete() or not meta.did_error():
                    continue
                lines = [line for line in meta.stderr_lines if line.strip()] or [
                    line for line in meta.stdout_lines if line.strip()
                ]
                step = ", ".join(state.get_op_meta(op_hash).names)
                self(host.name).fail(f"{step}: {lines[-1].strip() if lines else 'failed'}")
                break
            else:
                self(host.name).fail("failed (see pyinfra's output above)")

    def summary_lines(self, failed_only: bool = False) -> list[str]:
        width = max((len(name) for name in self.outcomes), default=0)
        lines = []
        for name in sorted(self.outcomes):
            record = self.outcomes[name]
            if failed_only and not record.error:
                continue
            detail = record.error or (record.system or "-")
            details = record.changed + record.notes
            what = f" ({'; '.join(details)})" if details else ""
            lines.append(f"{name:<{width}}  {record.status:<9}  {detail}{what}")
        return lines

    def print(self, state: Any, addresses: Mapping[str, str]) -> None:
        """Print the plan and the summary, and write the JSON report."""
        if not self.outcomes:
            return
        if not state.is_executing:
            # --dry, or the run stopped while preparing: nothing was changed.
            print("\n--> flakefleet: nothing was executed", file=sys.stderr)
            evaluated = self.evaluated_lines()
            if evaluated:
                print("\n--> flakefleet: the systems evaluated", file=sys.stderr)
            for line in evaluated:
                print(f"    {line}", file=sys.stderr)
            self.write()
            return
        self.explain_failures(state, addresses)
        plans = [line for name in sorted(self.outcomes) for line in self.outcomes[name].plan]
        if plans:
            kind = "status" if any(r.state for r in self.outcomes.values()) else "plan"
            print(f"\n--> flakefleet {kind}", file=sys.stderr)
            for line in plans:
                print(f"    {line}", file=sys.stderr)
        summary = self.summary_lines(failed_only=bool(plans))  # a plan changed nothing
        if summary:
            print("\n--> flakefleet summary", file=sys.stderr)
        for line in summary:
            print(f"    {line}", file=sys.stderr)
        self.write()

    def evaluated_lines(self) -> list[str]:
        """Each evaluated machine's system and derivation, and whether it runs it already
        (what a dry run can say without building)."""
        evaluated = {name: r for name, r in sorted(self.outcomes.items()) if r.system}
        width = max((len(name) for name in evaluated), default=0)
        return [
            f"{name:<{width}}  {'runs it' if r.running == r.system else 'would change':<12}  "
            f"{r.system} (derivation {r.derivation})"
            for name, r in evaluated.items()
        ]

    def write(self) -> None:
        """The JSON report, to $FLAKEFLEET_REPORT if set."""
        path = os.environ.get("FLAKEFLEET_REPORT")
        if path:
            with open(path, "w") as stream:
                json.dump(self.as_dict(), stream, indent=2)

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """Every machine's outcome, with its status, as the JSON report has it."""
        return {name: {**asdict(r), "status": r.status} for name, r in self.outcomes.items()}
