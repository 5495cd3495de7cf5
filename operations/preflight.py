"""The preflight: take the machine's deploy lock and read its state, in one round trip; and the
lock's release at the end of the run.

A machine whose deploy fails keeps no lock: whatever pyinfra skipped, the locks this run
still holds are released over new connections when the run closes.
"""

from __future__ import annotations

from typing import Any

from pyinfra import host, state
from pyinfra.api import FunctionCommand, operation

from facts.machine import Preflight
from flakefleet import identity, sudo
from flakefleet.fleet import PYINFRA_PRIVILEGE_KEYS
from flakefleet.lock import Holder, release_command, take_over_command
from flakefleet.models import MachineState, PreflightState
from flakefleet.run import Run
from operations.refuse import refuse


def preflight() -> MachineState | None:
    """Take the machine's deploy lock and read its state, in one round trip.

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
    run.locks.add(host.name)  # before the preflight may take it: released at exit, whatever
    try:
        found = target.read_as_root(
            host,
            Preflight,
            lock_dir=target.state_dir,
            holder=str(run.deployer),
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

    The lock was taken by the preflight fact, or it is taken over (an operation) from a
    deployer that died on this controller or that the user names in `break_lock` (one on
    another controller that will not come back), or the machine is failed naming the holder.
    While an activation worker is busy on the machine, nobody takes it, whoever holds the lock.
    """
    outcome = run.outcome(host.name)
    if found.dead_workers:
        outcome.note(
            f"an earlier activation's worker died before it finished; the machine runs "
            f"{found.machine.current_system or 'nothing'}"
        )
    holder = Holder.parse(found.lock_holder)
    if found.lock_acquired:
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
    run.locks.discard(host.name)
    return False


@operation(is_idempotent=False)
def _take_over(stale: str):
    run = Run.of(state)
    target = run.target(host.name)
    yield target.command(take_over_command(target.state_dir, stale, run.deployer))


@operation(is_idempotent=False)
def release():
    """Release this run's lock on the machine."""
    run = Run.of(state)
    target = run.target(host.name)
    yield target.command(release_command(target.state_dir, run.deployer))
    yield FunctionCommand(_released, (), {})


def _released(state: Any, host: Any) -> bool:
    run = Run.of(state)
    run.locks.discard(host.name)
    run.finished.add(host.name)  # the release is a deploy's last step
    return True
