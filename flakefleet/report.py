"""The run summary: one line per machine saying what happened to it and, on failure, why.

Operations record what they changed and why they failed; the summary is printed when pyinfra
exits (after its own results), and written as JSON to $FLAKEFLEET_REPORT when that is set.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, NoReturn

from pyinfra.api import FunctionCommand, operation
from pyinfra.api.state import State


@dataclass
class Outcome:
    """What a deploy did to one machine."""

    machine: str
    goal: str = ""
    changed: list[str] = field(default_factory=list)
    system: str | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    plan: list[str] = field(default_factory=list)  # deploy/plan.py: what a deploy would do

    @property
    def status(self) -> str:
        if self.error:
            return "failed"
        return "changed" if self.changed else "unchanged"


_outcomes: dict[str, Outcome] = {}
_state: State | None = None


def outcome(machine: str) -> Outcome:
    """The outcome record of a machine, created on first use."""
    return _outcomes.setdefault(machine, Outcome(machine))


def changed(machine: str, what: str) -> None:
    """Record that a step changed the machine (e.g. 'sources', 'closure', 'switch')."""
    record = outcome(machine)
    if what not in record.changed:
        record.changed.append(what)


def failed(machine: str, reason: str) -> None:
    """Record why a machine failed; the first reason is the one that counts."""
    record = outcome(machine)
    if record.error is None:
        record.error = reason


def note(machine: str, text: str) -> None:
    outcome(machine).notes.append(text)


def change(what: str) -> FunctionCommand:
    """A command that records, when it runs, that a step changed the machine."""
    return FunctionCommand(_record_change, (what,), {})


def stop(reason: str) -> FunctionCommand:
    """A command that fails the machine with a reason; its later steps are skipped."""
    return FunctionCommand(_record_failure, (reason,), {})


_stopping: set[int] = set()  # runs already ending on bad input


def stop_run(state: State, lines: list[str], reasons: dict[str, str], others: str) -> NoReturn:
    """End the run on bad input, before it touches any machine: each machine is failed with
    its reason (the rest with `others`), and pyinfra exits with one line per problem.

    Only the first caller raises at once. The other machines' deploy files, still running in
    their greenlets, would run on while the interpreter shuts down: they wait here instead.
    """
    if id(state) in _stopping:
        threading.Event().wait(timeout=60)  # never set: the run ends meanwhile
        raise SystemExit(1)
    _stopping.add(id(state))
    for each in state.inventory.get_active_hosts():  # the summary, if any, stays true
        failed(each.name, reasons.get(each.name, others))
    raise SystemExit("\n".join(f"flakefleet: {line}" for line in lines))


@operation(is_idempotent=False)
def refuse(reason: str):
    """Fail the machine with `reason` before anything on it is touched; its later steps are
    skipped."""
    yield stop(reason)


def _record_change(state: State, host: Any, what: str) -> bool:
    changed(host.name, what)
    return True


def _record_failure(state: State, host: Any, reason: str) -> bool:
    failed(host.name, reason)
    return False


def install(state: State) -> None:
    """Collect outcomes for this run and print the summary at exit (idempotent)."""
    global _state
    if _state is state:
        return
    _state = state
    atexit.register(_finish)


def _explain_failures(state: State) -> None:
    """Give failed machines without a recorded reason the failing operation and its output."""
    for host in state.inventory:
        if host not in state.failed_hosts or outcome(host.name).error:
            continue
        if host not in state.activated_hosts:
            address = (
                f"{host.data.get('ssh_hostname') or host.name}:{host.data.get('ssh_port', 22)}"
            )
            failed(host.name, f"unreachable: could not connect over SSH to {address}")
            continue
        for op_hash in state.get_op_order():
            op_data = state.ops[host].get(op_hash)
            meta = op_data.operation_meta if op_data else None
            if meta is None or not meta.is_complete() or not meta.did_error():
                continue
            meta = op_data.operation_meta
            lines = [line for line in meta.stderr_lines if line.strip()] or [
                line for line in meta.stdout_lines if line.strip()
            ]
            step = ", ".join(state.get_op_meta(op_hash).names)
            failed(host.name, f"{step}: {lines[-1].strip() if lines else 'failed'}")
            break
        else:
            failed(host.name, "failed (see pyinfra's output above)")


def summary_lines(failed_only: bool = False) -> list[str]:
    width = max((len(name) for name in _outcomes), default=0)
    lines = []
    for name in sorted(_outcomes):
        record = _outcomes[name]
        if failed_only and not record.error:
            continue
        detail = record.error or (record.system or "-")
        details = record.changed + record.notes
        what = f" ({'; '.join(details)})" if details else ""
        lines.append(f"{name:<{width}}  {record.status:<9}  {detail}{what}")
    return lines


def _finish() -> None:
    if _state is None or not _outcomes:
        return
    if not _state.is_executing:
        # --dry, or the run stopped while preparing: nothing was changed.
        print("\n--> flakefleet: nothing was executed", file=sys.stderr)
        return
    _explain_failures(_state)
    plans = [line for name in sorted(_outcomes) for line in _outcomes[name].plan]
    if plans:
        print("\n--> flakefleet plan", file=sys.stderr)
        for line in plans:
            print(f"    {line}", file=sys.stderr)
    summary = summary_lines(failed_only=bool(plans))  # a plan changed nothing: say only why
    if summary:
        print("\n--> flakefleet summary", file=sys.stderr)
    for line in summary:
        print(f"    {line}", file=sys.stderr)
    path = os.environ.get("FLAKEFLEET_REPORT")
    if path:
        with open(path, "w") as stream:
            json.dump(
                {name: {**asdict(r), "status": r.status} for name, r in _outcomes.items()},
                stream,
                indent=2,
            )
