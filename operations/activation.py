"""Activation: make a system what the machine runs (switch, test) or boots (boot).

The remote half is ``scripts/activate.sh``, and the protocol between the two halves is
``flakefleet.worker``. The worker runs detached on the machine (under ``systemd-run`` where
there is systemd), so a dropped connection cannot kill it halfway; the deployer waits for its
outcome, over new connections if the first one breaks. After a switch or test it waits for a
confirmation made over a *new* SSH connection once the health checks pass
(``verify.health_gate``); without one it rolls the machine back by itself.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from importlib.resources import files
from typing import Any

from pyinfra import host, state
from pyinfra.api import FunctionCommand, operation

from flakefleet import nix
from flakefleet.models import Goal, MachineState
from flakefleet.run import Run, fail
from flakefleet.target import Target, Unreachable
from flakefleet.worker import BUSY, Activation, Phase, Unanswered, parse_answer
from operations.refuse import refuse

WORKER = files("operations").joinpath("scripts/activate.sh").read_text()


def supports(goal: Goal) -> bool:
    """Whether the machine's class has `goal`. If not, the machine fails now, before anything
    on it is touched (nix-darwin and home-manager have no boot entry to select, nor a test)."""
    reason = goal.unsupported(Run.of(state).target(host.name).machine_class)
    if reason:
        refuse(name=f"Goal {goal}", reason=reason)
    return reason is None


@operation()
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
    activation = Activation(
        id=uuid.uuid4().hex[:12],
        machine_class=target.machine_class,
        goal=goal,
        system=system.out,
        profile=target.profile,
        confirm_timeout=confirm_timeout if goal.runs_new_system else 0,
        state_dir=target.state_dir,
    )
    yield FunctionCommand(_activate, (activation,), {})


@operation()
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
    activation = Activation(
        id=uuid.uuid4().hex[:12],
        machine_class=target.machine_class,
        goal=Goal.SWITCH,
        system=chosen.system,
        profile=target.profile,
        confirm_timeout=confirm_timeout,
        state_dir=target.state_dir,
        generation=chosen.number,
    )
    yield FunctionCommand(_activate, (activation,), {})


def _activate(state: Any, host: Any, activation: Activation) -> bool:
    """Launch the worker and wait for its outcome, reconnecting if the connection breaks."""
    run = Run.of(state)
    target, outcome = run.target(host.name), run.outcome(host.name)
    if run.stopped:
        outcome.fail(f"not activated: the rollout stopped ({run.stopped[0]})")
        return False
    try:
        phase, message = _ask(target, activation.launch_command(), stdin=WORKER)
    except Unreachable as error:
        # The worker goes on without us: wait for it over new connections, and give pyinfra
        # a new connection too, as its own was most likely cut at the same time.
        outcome.note(f"connection lost during activation ({error}); reconnected")
        phase, message = _wait(target, activation, (Phase.RUNNING,))
        target.reconnect(host, reason="after the connection was lost")
    if phase is Unanswered.NOT_STARTED:
        outcome.fail("activation: could not start it (connection failed)")
        return False
    if phase is Phase.AWAITING_CONFIRMATION:
        run.pending[host.name] = activation  # changed once confirmed
        return True
    if phase is not Phase.SUCCEEDED:
        outcome.fail(f"activation: {_loud(target, phase, message)}")
        return False
    if activation.goal is not Goal.DRY_ACTIVATE:
        outcome.changed_by(activation.goal)
    return True


def _loud(target: Target, phase: Phase | Unanswered, message: str) -> str:
    """The worker's message; a failed rollback is shouted, with where the machine stands."""
    if phase is not Phase.ROLLBACK_FAILED:
        return message
    try:
        running, selected = target.run(
            f"readlink -f {target.running_link}; readlink -f {target.profile}", timeout=30
        ).stdout.split()[:2]
    except (Unreachable, ValueError):
        return f"ROLLBACK FAILED: {message}; the machine's state could not be read"
    return (
        f"ROLLBACK FAILED: {message}; the machine runs {running} and its profile selects "
        f"{selected}: fix it by hand"
    )


def _ask(target: Target, command: str, stdin: str | None = None) -> tuple[Phase | Unanswered, str]:
    """Run a launch or wait command over a new connection; the phase and message it printed."""
    completed = target.run(command, stdin=stdin, timeout=900)
    return parse_answer(completed.returncode, completed.stdout, completed.stderr)


def _wait(
    target: Target, activation: Activation, busy: tuple[Phase, ...]
) -> tuple[Phase | Unanswered, str]:
    """Wait for the worker to leave the `busy` phases, over new connections as needed.

    Keeps trying to connect for at least the confirmation timeout, as the machine may only
    become reachable again once it has rolled itself back.
    """
    deadline = time.monotonic() + max(activation.confirm_timeout + 30, 60)
    while True:
        try:
            return _ask(target, activation.wait_command(busy))
        except Unreachable as error:
            if time.monotonic() > deadline:
                return Unanswered.UNREACHABLE, f"{target.name} unreachable: {error}"
            time.sleep(1)


def confirm(run: Run, name: str) -> tuple[bool, str]:
    """Confirm the machine's pending activation over a new SSH connection.

    Returns whether the machine stayed on its new system, and what happened.
    """
    activation, target = run.pending.pop(name), run.target(name)
    try:
        target.run(activation.confirm_command(), timeout=30)
    except Unreachable as error:
        # The new system may have broken logins: the machine rolls itself back on time.
        phase, message = _wait(target, activation, BUSY)
        message = _loud(target, phase, message)
        return False, f"could not confirm over a new SSH connection ({error}); {message}"
    phase, message = _wait(target, activation, BUSY)
    if phase is Phase.SUCCEEDED:
        run.outcome(name).changed_by(activation.goal)
    return phase is Phase.SUCCEEDED, _loud(target, phase, message)


def abort(run: Run, name: str, reason: str) -> str:
    """Have the machine roll its pending activation back now; returns what happened."""
    activation, target = run.pending.pop(name), run.target(name)
    with contextlib.suppress(Unreachable):  # if not, it rolls back by itself on time
        target.run(activation.abort_command(), stdin=reason, timeout=30)
    phase, message = _wait(target, activation, BUSY)
    return _loud(target, phase, message)
