"""Reboots: when the new system needs one (or always), reboot, wait for the machine to come
back on the expected system, and check it again.

`reboot` data: ``never`` (default), ``when-needed``, ``always``. A reboot is needed when the
machine should boot a system it does not run (goal ``boot``), or when the booted kernel,
initrd or kernel modules differ from the new system's.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from pyinfra import host, state
from pyinfra.api import FunctionCommand, operation

from facts.nix import BOOT_IDENTITY, needs_reboot_command
from flakefleet import checks, nix
from flakefleet.models import RUNNING_SYSTEM, Goal, MachineState
from flakefleet.run import Run
from flakefleet.settings import RebootPolicy
from flakefleet.target import Unreachable
from operations.preflight import changes_machine
from operations.verify import run_smoke_checks


@operation(is_idempotent=False)
@changes_machine
def reboot(
    system: nix.System,
    machine: MachineState,
    goal: Goal,
    policy: RebootPolicy = RebootPolicy.NEVER,
    timeout: float = 300,
    command: str = "reboot",
):
    """Reboot the machine if `policy` says so, and wait until it runs `system` again.

    + machine: its state, as the preflight read it
    + command: how the machine is rebooted (`reboot_command`)
    """
    if policy is RebootPolicy.NEVER or not goal.sets_profile:
        host.noop("no reboot")
        return
    unchanged = not Run.of(state).outcome(host.name).changed  # by this run's earlier steps
    if policy is RebootPolicy.WHEN_NEEDED and unchanged and machine.booted_system == system.out:
        host.noop(f"{host.name} booted {system.out}")  # the kernel, initrd and modules it runs
        return
    yield FunctionCommand(_reboot, (system.out, policy, timeout, command), {})


def _reboot(
    state: Any, host: Any, system: str, policy: RebootPolicy, timeout: float,
    command: str,
) -> bool:  # fmt: skip
    run = Run.of(state)
    target, outcome = run.target(host.name), run.outcome(host.name)
    try:
        boot_id, verdict = target.run(needs_reboot_command(system), timeout=60).stdout.split()[:2]
    except (Unreachable, ValueError) as error:
        outcome.fail(f"reboot: could not read the boot state ({error})")
        return False
    if policy is RebootPolicy.WHEN_NEEDED and verdict != "needed":
        outcome.note("no reboot needed")
        return True

    with contextlib.suppress(Unreachable):  # it may already be gone
        # The connection usually dies with the machine; that is expected.
        target.run(f"nohup sh -c 'sleep 1; {command}' >/dev/null 2>&1 &", timeout=30)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(1)
        try:
            lines = target.run(
                f"{BOOT_IDENTITY}; readlink -f {RUNNING_SYSTEM}", timeout=15
            ).stdout.split()
        except Unreachable:
            continue
        if len(lines) == 2 and lines[0] != boot_id:
            if lines[1] != system:
                outcome.fail(f"reboot: came back on {lines[1]}, expected {system}")
                return False
            outcome.changed_by("rebooted")
            if not target.reconnect(host, reason="after the reboot"):
                outcome.fail("reboot: back, but pyinfra could not reconnect")
                return False
            failures = run_smoke_checks(run, [host.name])[host.name].failures
            failures += checks.run_checks(run, host.name)
            if failures:
                outcome.fail(f"after the reboot, checks failed: {', '.join(failures)}")
                return False
            return True
    outcome.fail(f"reboot: not back with a new boot id within {timeout:.0f}s")
    return False
