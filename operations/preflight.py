"""The preflight: read the machine's state and whether its deploy lock is free, in one round
trip; the lock, taken by the first step with work on the machine (``changes_machine``); and its
release at the end of the run. A machine with nothing to do is never locked: its redeploy costs
the preflight alone.

A machine whose deploy fails keeps no lock: whatever pyinfra skipped, the locks this run
still holds are released over new connections when the run closes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec

from pyinfra import host, state
from pyinfra.api import FunctionCommand, operation

from facts.machine import Preflight
from flakefleet import identity, sudo
from flakefleet.fleet import PYINFRA_PRIVILEGE_KEYS
from flakefleet.lock import Holder, acquire_command, release_command, take_over_command
from flakefleet.models import MachineState, PreflightState
from flakefleet.run import Run, fails
from operations.refuse import refuse

P = ParamSpec("P")


def preflight() -> MachineState | None:
    """Read the machine's state, and whether its deploy lock is free, in one round trip.

    Returns the machine's state, or None when another deploy holds the machine or sudo
    refuses (it is then failed with the reason, and the deploy file skips its steps). When
    sudo asks for a password the run has not got yet, it is asked for (once per run) and the
    preflight runs again with it.
    """
    run = Run.of(state)
    target = run.target(host.name)
    pyinfra_privilege = sorted(key for key in PYINFRA_PRIVILEGE_KEYS if host.data.get(key))
    if pyinfra_privilege:  # set in group_data/*.py (the fleet file refuses them itself)
        refuse(
            name="Deploy lock",
            reason=f"data {pyinfra_privilege[0]}: remove it: flakefleet runs sudo itself",
        )
        return None
    try:
        found = target.read_as_root(
            host,
            Preflight,
            lock_dir=target.state_dir,
            profile=target.profile,
            running=target.running_link,
            machine_id=_expected(run),
        )
    except sudo.SudoError as error:
        _locked(run, str(error))
        return None
    if found.sudo_refusal:
        _locked(run, f"sudo refused to run the deploy: {found.sudo_refusal}")
        return None
    if found.other:
        where = f"{target.address}:{target.port or 22}"
        _locked(run, identity.mismatch(host.name, found.machine_id, _expected(run), where))
        return None
    if found.lock_problem:
        _locked(run, f"no deploy lock: {found.lock_problem}")
        return None
    key = identity.host_key(host)
    if key and found.machine_id:
        run.identities.remember(host.name, key, found.machine_id)
    return found.machine if hold(run, found) else None


def _expected(run: Run) -> str:
    """The machine id the machine must have ("": any), see ``flakefleet.identity``."""
    accepted = run.settings(host.name).accept_machine_id
    key = identity.host_key(host)
    return accepted or (run.identities.expected(host.name, key) if key else "")


def hold(run: Run, found: PreflightState) -> bool:
    """Decide, at prepare time, whether this run may deploy the machine.

    The lock is free (the first step with work on the machine takes it), or it is taken over
    now (an operation) from a deployer that died on this controller or that the user names in
    `break_lock` (one on another controller that will not come back), or the machine is failed
    naming the holder. While an activation worker is busy on the machine, nobody takes it,
    whoever holds the lock.
    """
    outcome = run.outcome(host.name)
    if found.dead_workers:
        outcome.note(
            f"an earlier activation's worker died before it finished; the machine runs "
            f"{found.machine.current_system or 'nothing'}"
        )
    holder = Holder.parse(found.lock_holder)
    if found.lock_free:
        run.unlocked[host.name] = found.serial
        return True
    broken = holder is not None and run.settings(host.name).break_lock == holder.name
    if holder is not None and broken and holder.is_alive_here():
        return _locked(
            run,
            f"break_lock names {holder.describe()}, which is still running on this controller: "
            "break_lock is for a deployer that is gone; wait for it, or stop it",
        )
    gone = holder is not None and (holder.is_dead() or broken)
    if found.activations_in_progress:
        if holder is not None and not gone:
            return _locked(run, _held_by(holder))
        left = (
            f"a deployer that {'was named in break_lock' if broken else 'died'} "
            f"({holder.describe()}) left an activation in progress"
            if holder is not None
            else "an activation is in progress on the machine"
        )
        return _locked(
            run,
            f"locked: {left}; it completes or rolls back by itself within its confirmation timeout",
        )
    if holder is None:
        return _locked(run, f"locked by another deploy ({found.lock_holder or 'unknown holder'})")
    if not gone:
        return _locked(run, _held_by(holder))
    run.locks.add(host.name)  # from here on, released at exit whatever happens
    _take_over(name="Take over a stale lock", stale=str(holder))
    how = "broke (break_lock)" if broken else "took over"
    outcome.note(f"{how} the lock of a deployer that died ({holder.describe()})")
    return True


def _held_by(holder: Holder) -> str:
    return (
        f"locked by another deploy ({holder.describe()}); if that deploy is gone for good, "
        f"run again with --data break_lock={holder.name}"
    )


def _locked(run: Run, reason: str) -> bool:
    """Fail the machine before anything on it is touched; this run holds no lock on it."""
    refuse(name="Deploy lock", reason=reason)
    return False


def changes_machine(
    operation: Callable[P, Iterator[Any]],
) -> Callable[P, Iterator[Any]]:
    """For an operation that changes the machine: its first command is preceded by taking the
    deploy lock, unless this run holds it already. An operation with nothing to do takes no
    lock, and a machine no step changes is never locked.

    Decorate the operation's generator, under ``@operation()``. Its generator runs when the
    operation runs (pyinfra 3), after the machine's earlier steps, so it sees whether one of
    them took the lock.
    """

    @functools.wraps(operation)
    def commands(*args: P.args, **kwargs: P.kwargs) -> Iterator[Any]:
        found = operation(*args, **kwargs)
        first = next(found, None)
        if first is None:
            return
        if host.name not in Run.of(state).locks and not fails(first):
            yield FunctionCommand(_take_lock, (), {})
        yield first
        yield from found

    return commands


def _take_lock(state: Any, host: Any) -> bool:
    """Take the machine's lock, if nobody took it since the preflight found it free."""
    run = Run.of(state)
    target = run.target(host.name)
    run.locks.add(host.name)  # released at exit, whatever happens from here on
    script = acquire_command(target.state_dir, run.deployer, run.unlocked[host.name])
    _, output = target.run_over(host, script)
    answer = "\n".join(output.stdout_lines).strip()
    if answer == "lock acquired":
        return True
    run.locks.discard(host.name)
    if answer.startswith("lock held"):
        holder = Holder.parse(answer.removeprefix("lock held"))
        reason = _held_by(holder) if holder else f"locked by another deploy ({answer})"
    elif answer == "lock changed":
        reason = "another deploy took the machine since this run read it: run again"
    else:
        reason = f"no deploy lock: {answer.removeprefix('lock failed:').strip() or 'no answer'}"
    run.outcome(host.name).fail(reason)
    return False


@operation(is_idempotent=False)
def _take_over(stale: str):
    run = Run.of(state)
    target = run.target(host.name)
    yield target.command(take_over_command(target.state_dir, stale, run.deployer))


@operation(is_idempotent=False)
def release():
    """Release this run's lock on the machine, if it took it."""
    run = Run.of(state)
    target = run.target(host.name)
    if host.name in run.locks:
        yield target.command(release_command(target.state_dir, run.deployer))
    yield FunctionCommand(_released, (), {})


def _released(state: Any, host: Any) -> bool:
    run = Run.of(state)
    run.locks.discard(host.name)
    run.finished.add(host.name)  # the release is a deploy's last step
    return True
