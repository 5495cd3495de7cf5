"""The deploy lock: taken in the preflight round trip, released at the end of the run.

A machine whose deploy fails keeps no lock: whatever pyinfra skipped, the locks this run
still holds are released over new connections when it exits.
"""

from __future__ import annotations

import atexit
from typing import Any

from pyinfra import host
from pyinfra.api import FunctionCommand, operation

from facts.machine import MachineState, Preflight, PreflightState, system_links
from flakefleet import report, sudo
from flakefleet.fleet import PYINFRA_PRIVILEGE_KEYS
from flakefleet.lock import Holder, release_command, take_over_command, this_deployer
from flakefleet.remote import Unreachable, run_on, state_dir

# Machines whose lock this run holds, with their host data for the release at exit.
_held: dict[str, Any] = {}
_release_registered = False


def preflight() -> MachineState | None:
    """Take the machine's deploy lock and read its state, in one round trip.

    Returns the machine's state, or None when another deploy holds the machine or sudo
    refuses (it is then failed with the reason, and the deploy file skips its steps). When
    sudo asks for a password the run has not got yet, it is asked for (once per run) and the
    preflight runs again with it.
    """
    pyinfra_privilege = sorted(key for key in PYINFRA_PRIVILEGE_KEYS if host.data.get(key))
    if pyinfra_privilege:  # set in group_data/*.py (the fleet file refuses them itself)
        report.refuse(
            name="Deploy lock",
            reason=f"data {pyinfra_privilege[0]}: remove it: flakefleet runs sudo itself",
        )
        return None
    _release_at_exit(host.name, host.data)  # before the preflight may take the lock
    try:
        if sudo.needed(host.data) and host.data.get("sudo_password_command"):
            sudo.obtain_password(host.data, host.name)  # on the controller: saves a round trip
        state = _read_preflight()
        if state.sudo_refusal and sudo.wants_password(state.sudo_refusal):
            sudo.obtain_password(host.data, host.name)
            state = _read_preflight()
    except sudo.SudoError as error:
        _held.pop(host.name, None)
        report.refuse(name="Deploy lock", reason=str(error))
        return None
    if state.sudo_refusal:
        _held.pop(host.name, None)
        report.refuse(
            name="Deploy lock", reason=f"sudo refused to run the deploy: {state.sudo_refusal}"
        )
        return None
    return state.machine if hold(state) else None


def _release_at_exit(name: str, data: Any) -> None:
    """Have the machine's lock released when the run ends, however it ends: even a run that
    dies while preparing (the release removes only a lock this run holds)."""
    global _release_registered
    if not _release_registered:
        atexit.register(_release_all)
        _release_registered = True
    _held[name] = data


def _read_preflight() -> PreflightState:
    profile, running = system_links(host.data)
    become = sudo.how(host.data)
    return host.get_fact(
        Preflight,
        lock_dir=state_dir(host.data),
        holder=str(this_deployer()),
        profile=profile,
        running=running,
        become=become,
        nix_dir=host.data.get("remote_nix_dir"),
        _stdin=sudo.stdin(host.data, become),
    )


def hold(preflight: PreflightState) -> bool:
    """Decide, at prepare time, whether this run may deploy the machine.

    The lock was taken by the preflight fact, or it is taken over (an operation) from a
    deployer that died on this controller or that the user names in `break_lock` (one on
    another controller that will not come back), or the machine is failed naming the holder.
    """
    if preflight.lock_acquired:
        return True
    holder = Holder.parse(preflight.lock_holder)
    if holder is None:
        return _locked(f"locked by another deploy ({preflight.lock_holder or 'unknown holder'})")
    broken = host.data.get("break_lock") == holder.name
    if not (holder.is_dead() or broken):
        return _locked(
            f"locked by another deploy ({holder.describe()}); if that deploy is gone for good, "
            f"run again with --data break_lock={holder.name}"
        )
    if preflight.activations_in_progress:
        return _locked(
            f"locked: a deployer that {'was named in break_lock' if broken else 'died'} "
            f"({holder.describe()}) left an activation in progress; it completes or rolls back "
            "by itself within its confirmation timeout"
        )
    _take_over(name="Take over a stale lock", stale=str(holder))
    how = "broke (break_lock)" if broken else "took over"
    report.note(host.name, f"{how} the lock of a deployer that died ({holder.describe()})")
    return True


def _locked(reason: str) -> bool:
    report.refuse(name="Deploy lock", reason=reason)
    _held.pop(host.name, None)
    return False


@operation(is_idempotent=False)
def _take_over(stale: str):
    yield sudo.root_command(
        host.data, take_over_command(state_dir(host.data), stale, this_deployer())
    )


@operation(is_idempotent=False)
def release():
    """Release this run's lock on the machine."""
    yield sudo.root_command(host.data, release_command(state_dir(host.data), this_deployer()))
    yield FunctionCommand(_released, (), {})


def _released(state: Any, host: Any) -> bool:
    _held.pop(host.name, None)
    return True


def _release_all() -> None:
    for name, data in list(_held.items()):
        try:
            run_on(data, name, release_command(state_dir(data), this_deployer()), timeout=30)
        except Unreachable:
            report.note(name, "could not release the deploy lock (unreachable)")
