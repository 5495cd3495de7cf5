"""Activation: make a system what the machine runs (switch, test) or boots (boot).

The remote half is ``scripts/activate.sh``, and the protocol between the two halves is
``flakefleet.worker``. The worker runs detached on the machine (under ``systemd-run`` where
there is systemd), so a dropped connection cannot kill it halfway; the deployer waits for its
outcome, over new connections if the first one breaks. After a switch or test it waits for a
confirmation made over a *new* SSH connection once the health checks pass
(``verify.health_gate``); without one it rolls the machine back by itself.
"""

from __future__ import annotations

import time
from importlib.resources import files
from typing import Any

from pyinfra import host, state
from pyinfra.api import FunctionCommand, operation

from flakefleet import nix, worker
from flakefleet.models import Goal, MachineState, sources_undo_file
from flakefleet.run import Run, fail
from flakefleet.target import Target, Unreachable
from flakefleet.worker import BUSY, Activation, Phase, Unanswered
from operations.preflight import changes_machine
from operations.refuse import refuse

WORKER = files("operations").joinpath("scripts/activate.sh").read_text()
# The worker's message when the new system only runs from the next boot (exit 100).
REBOOT_REQUIRED = "activated for next boot; reboot required"


def supports(goal: Goal) -> bool:
    """Whether the machine's class has `goal`. If not, the machine fails now, before anything
    on it is touched (nix-darwin and home-manager have no boot entry to select, nor a test)."""
    reason = goal.unsupported(Run.of(state).target(host.name).machine_class)
    if reason:
        refuse(name=f"Goal {goal}", reason=reason)
    return reason is None


@operation()
@changes_machine
def activate(
    system: nix.System, machine: MachineState, goal: Goal = Goal.SWITCH, confirm_timeout: float = 30
):
    """Make the system what the machine runs (switch, test), boots (boot), or show what would
    change (dry-activate). A failed activation rolls the machine back and fails it.

    + confirm_timeout: seconds a switch or test waits for the health gate's confirmation
      before the machine rolls itself back (0: no confirmation, keep whatever happens)

    Example:

    .. code:: python

        activation.activate(name="Activate", system=target, machine=machine, goal=Goal.BOOT)
    """
    run = Run.of(state)
    target = run.target(host.name)
    reason = goal.unsupported(target.machine_class)
    if reason:
        yield fail(f"activate: {reason}")
        return
    run.outcome(host.name).goal = goal
    if not goal.activates or goal.reached(machine, system.out):
        host.noop(f"{host.name} is already on {system.out} for {goal}")
        return
    activation = Activation.on(
        target,
        goal,
        system.out,
        confirm_timeout if goal.runs_new_system else 0,
        sources_root=machine.var_src.root,
        sources_undo=sources_undo_file(machine.var_src.root, run.id),
        record_base=run.record_base(host.name),
    )
    yield FunctionCommand(_activate, (activation,), {})


@operation()
@changes_machine
def roll_back(machine: MachineState, generation: int | None = None, confirm_timeout: float = 30):
    """Switch the machine back one generation, or to `generation`, and activate it, with the
    same safety as a deploy (detached, confirmed after the health checks, rolled back on failure).

    Example:

    .. code:: python

        activation.roll_back(name="Roll back", machine=machine, generation=41)
    """
    run = Run.of(state)
    target = run.target(host.name)
    current = next((g for g in machine.generations if g.current), None)
    if generation is None:
        older = [g for g in machine.generations if current and g.number < current.number]
        chosen = older[-1] if older else None
        missing = "there is no generation older than the current one"
    else:
        chosen = next((g for g in machine.generations if g.number == generation), None)
        missing = f"generation {generation} does not exist"
    if chosen is None or chosen.system is None:
        yield fail(f"rollback: {missing}")
        return
    run.outcome(host.name).system = chosen.system
    if chosen.current and machine.current_system == chosen.system:
        host.noop(f"{host.name} already runs generation {chosen.number}")
        return
    # The sources go back to those the generation was deployed with, where it was recorded.
    activation = Activation.on(
        target,
        Goal.SWITCH,
        chosen.system,
        confirm_timeout,
        generation=chosen.number,
        sources_root=machine.var_src.root,
        sources_undo=sources_undo_file(machine.var_src.root, run.id),
        record_base=run.record_base(host.name),
    )
    yield FunctionCommand(_activate, (activation,), {})


def _activate(state: Any, host: Any, activation: Activation) -> bool:
    """Launch the worker and wait for its outcome, reconnecting if the connection breaks."""
    run = Run.of(state)
    target, outcome = run.target(host.name), run.outcome(host.name)
    if run.stopped:
        outcome.fail(f"not activated: the rollout stopped ({run.stopped[0]})")
        return False
    run.launched[host.name] = activation  # an interrupted run stops it (Run.close)
    try:
        answer = worker.ask(target, activation.launch_command(), stdin=WORKER)
    except Unreachable as error:
        # The worker goes on without us: wait for it over new connections, and give pyinfra
        # a new connection too, as its own was most likely cut at the same time.
        outcome.note(f"connection lost during activation ({error}); reconnected")
        answer = worker.wait(target, activation, (Phase.RUNNING,))
        target.reconnect(host, reason="after the connection was lost")
    phase = answer[0]
    if phase is Phase.AWAITING_CONFIRMATION:
        run.pending[host.name] = activation  # changed once confirmed
        hold(run, host.name, activation)
        return True
    del run.launched[host.name]
    if phase is Unanswered.NOT_STARTED:
        outcome.fail(f"activation: could not start it ({answer[1] or 'connection failed'})")
        return False
    if phase is not Phase.SUCCEEDED:
        outcome.fail(f"activation: {worker.explain(target, answer)}")
        return False
    if answer[1].startswith(REBOOT_REQUIRED):  # switch-to-configuration exited 100
        outcome.note(answer[1])
        run.awaiting_reboot.add(host.name)  # its checks wait for the reboot
    if activation.goal is not Goal.DRY_ACTIVATE:
        outcome.changed_by(activation.goal)
    return True


# Each machine's confirmation window starts when its own checks can begin. pyinfra runs a step
# on every machine before the next: the health gate starts once the slowest activation is over,
# and a machine that activated in a second would wait on one that takes a minute past its
# `confirm_timeout` and roll back. So while any other machine of the run is still activating,
# its window is held open: its timeout starts again (the worker's `hold`) every third of it,
# and once more when the last activation ends if it waited longer than HOLD_SLACK. Each hold is
# a new SSH login, as a confirmation is: a machine that no new login reaches (its new system
# cut it off) is held no longer, and rolls itself back within its window as before. (A window
# that only starts when the deployer says so would never start, and never roll back, when the
# deployer dies or the new system cuts it off first: a hold renews a window, it never opens one.)
HOLD_SLACK = 1.0  # seconds: a machine that waited less needs no last hold (one SSH command)


def hold(run: Run, name: str, activation: Activation) -> None:
    """Keep the machine's confirmation window open while other machines still activate; return
    when none does (its checks can then begin), or when it cannot be reached."""
    target = run.target(name)
    every = max(activation.confirm_timeout / 3, 1.0)
    started = last = time.monotonic()
    while set(run.launched) - set(run.pending):
        time.sleep(0.5)
        if time.monotonic() - last >= every:
            if not _hold(target, activation):
                return
            last = time.monotonic()
    if time.monotonic() - started > HOLD_SLACK:
        _hold(target, activation)


def _hold(target: Target, activation: Activation) -> bool:
    try:
        return target.run(activation.hold_command(), timeout=30).returncode == 0
    except Unreachable:
        return False


def confirm(run: Run, name: str) -> tuple[bool, str]:
    """Confirm the machine's pending activation over a new SSH connection.

    Returns whether the machine stayed on its new system, and what happened.
    """
    activation, target = run.pending.pop(name), run.target(name)
    # The confirmation and the wait for the worker's answer share the new login.
    confirm_and_wait = f"{activation.confirm_command()}; {activation.wait_command(BUSY)}"
    try:
        answer = worker.ask(target, confirm_and_wait)
    except Unreachable as error:
        # The new system may have broken logins: the machine rolls itself back on time (or the
        # connection broke after the confirmation landed: the worker's phase says which).
        answer = worker.wait(target, activation, BUSY)
        if answer[0] is not Phase.SUCCEEDED:
            run.launched.pop(name, None)
            explained = worker.explain(target, answer)
            return False, f"could not confirm over a new SSH connection ({error}); {explained}"
    run.launched.pop(name, None)
    if answer[0] is Phase.SUCCEEDED:
        run.outcome(name).changed_by(activation.goal)
    return answer[0] is Phase.SUCCEEDED, worker.explain(target, answer)


def abort(run: Run, name: str, reason: str) -> str:
    """Have the machine roll its pending activation back now; returns what happened."""
    activation, target = run.pending.pop(name), run.target(name)
    answer = worker.abort(target, activation, reason)
    run.launched.pop(name, None)
    return worker.explain(target, answer)
