"""Activation: make a system what the machine runs (switch, test) or boots (boot).

The remote half is ``scripts/activate.sh``. It runs detached on the machine (under
``systemd-run`` where there is systemd), so a dropped connection cannot kill it halfway; the
deployer waits for its outcome, over new connections if the first one breaks. After a
switch or test it waits for a confirmation made over a *new* SSH connection once the health
checks pass (``verify.health_gate``); without one it rolls the machine back by itself.
"""

from __future__ import annotations

import contextlib
import shlex
import time
import uuid
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

from pyinfra import host
from pyinfra.api import FunctionCommand, operation

from facts.machine import MachineState
from facts.nix import SYSTEM_PROFILE
from flakefleet import nix, report
from flakefleet.remote import Unreachable, reconnect, run_on, state_dir

GOALS = ("switch", "boot", "test", "dry-activate", "build")
# Goals each machine class supports (nix-darwin and home-manager only ever switch).
CLASS_GOALS = {
    "nixos": GOALS,
    "darwin": ("switch", "dry-activate", "build"),
    "home": ("switch", "build"),
}
WORKER = files("operations").joinpath("scripts/activate.sh").read_text()
# Phases after which the worker has nothing more to do.
FINAL_PHASES = ("succeeded", "failed", "rolled-back", "rollback-failed")


def unsupported(machine_class: str, goal: str) -> str | None:
    """Why a machine of `machine_class` cannot reach `goal`, or None when it can."""
    supported = CLASS_GOALS.get(machine_class, ())
    if goal in supported:
        return None
    return f"{machine_class} machines cannot {goal!r} (only {', '.join(supported)})"


def supports(goal: str) -> bool:
    """Whether the machine's class has `goal`. If not, the machine fails now, before anything
    on it is touched (nix-darwin and home-manager have no boot entry to select, nor a test)."""
    reason = unsupported(host.data.get("machine_class", "nixos"), goal)
    if reason:
        report.refuse(name=f"Goal {goal}", reason=reason)
    return reason is None


def has_system(goal: str, machine: MachineState, system: str) -> bool:
    """Whether the machine already is where `goal` would put it."""
    running = machine.current_system == system
    selected = machine.profile_system == system
    return {
        "switch": running and selected,
        "boot": selected,
        "test": running,
        "dry-activate": False,  # changes nothing, so it always runs
        "build": running or selected,
    }[goal]


@dataclass(frozen=True)
class Activation:
    """One activation of one machine, as the worker on the machine knows it."""

    id: str
    machine_class: str
    goal: str
    system: str
    profile: str
    confirm_timeout: int
    base: str  # flakefleet's runtime directory on the machine (flakefleet.remote.state_dir)
    generation: int | None = None  # switch the profile to this existing generation (rollback)

    @property
    def directory(self) -> str:
        return f"{self.base}/activation/{self.id}"

    def launch_command(self) -> str:
        """Start the worker detached (script on stdin), then wait for it to leave `running`."""
        worker = f"{self.directory}/activate.sh"
        arguments = shlex.join(
            [
                "/bin/sh", worker, self.directory, self.machine_class, self.goal, self.system,
                self.profile, str(self.confirm_timeout), str(self.generation or ""),
            ]
        )  # fmt: skip
        unit = f"flakefleet-activation-{self.id}"
        return (
            f"mkdir -p {self.directory} && cat > {worker} && "
            "if [ -d /run/systemd/system ] && command -v systemd-run >/dev/null; then "
            f"systemd-run --unit={unit} --collect --quiet -- {arguments}; "
            f"else setsid nohup {arguments} </dev/null >/dev/null 2>&1 & fi; "
            + self.wait_command(("running",))
        )

    def wait_command(self, busy: tuple[str, ...], seconds: int = 600) -> str:
        """Wait while the worker's phase is one of `busy`; print `phase=...` and the message."""
        phase = f"{self.directory}/phase"
        waiting = " || ".join(f'[ "$(cat {phase})" = {p} ]' for p in busy)
        return (
            f"i=0; while [ -d {self.directory} ] && {{ [ ! -e {phase} ] || {waiting}; }} "
            f"&& [ $i -lt {seconds * 10} ]; do sleep 0.1; i=$((i + 1)); done; "
            f'if [ -e {phase} ]; then echo "phase=$(cat {phase})"; cat {self.directory}/message; '
            "else echo phase=missing; fi"
        )


# The worker's message when the new system only runs from the next boot (exit 100), and the
# machines of this run in that state (their health checks wait for the reboot).
REBOOT_REQUIRED = "activated for next boot; reboot required"
_awaiting_reboot: set[str] = set()


def awaiting_reboot(name: str) -> bool:
    """Whether the machine's new system only runs after a reboot (its init is incompatible)."""
    return name in _awaiting_reboot


# Activations waiting for their confirmation, by machine name (see verify.health_gate).
_pending: dict[str, tuple[Activation, Any]] = {}
# Why the rollout stopped (a machine failed its checks with on_check_failure = stop).
_stopped: list[str] = []


def stop_rollout(reason: str) -> None:
    """Activate no further machine in this run."""
    _stopped.append(reason)


@operation()
def activate(
    system: nix.System, machine: MachineState, goal: str = "switch", confirm_timeout: int = 30
):
    """Make the system what the machine runs (switch, test), boots (boot), or show what would
    change (dry-activate). A failed activation rolls the machine back and fails it.

    + confirm_timeout: seconds a switch or test waits for the health gate's confirmation
      before the machine rolls itself back (0: no confirmation, keep whatever happens)

    Example:

    .. code:: python

        activation.activate(name="Activate", system=target, machine=machine, goal="boot")
    """
    machine_class = host.data.get("machine_class", "nixos")
    reason = unsupported(machine_class, goal)
    if reason:
        yield report.stop(f"activate: {reason}")
        return
    report.outcome(host.name).goal = goal
    if goal == "build" or has_system(goal, machine, system.out):
        host.noop(f"{host.name} is already on {system.out} for {goal}")
        return
    activation = Activation(
        id=uuid.uuid4().hex[:12],
        machine_class=machine_class,
        goal=goal,
        system=system.out,
        profile=nix.profile_path(machine_class, host.data.get("ssh_user") or "root"),
        confirm_timeout=confirm_timeout if goal in ("switch", "test") else 0,
        base=state_dir(host.data),
    )
    yield FunctionCommand(_activate, (activation,), {})


@operation()
def roll_back(machine: MachineState, generation: int | None = None, confirm_timeout: int = 30):
    """Switch the machine back one generation, or to `generation`, and activate it, with the
    same safety as a deploy (detached, confirmed after the health checks, rolled back on failure).

    Example:

    .. code:: python

        activation.roll_back(name="Roll back", machine=machine, generation=41)
    """
    machine_class = host.data.get("machine_class", "nixos")
    current = next((g for g in machine.generations if g.current), None)
    if generation is None:
        older = [g for g in machine.generations if current and g.number < current.number]
        target = older[-1] if older else None
        missing = "there is no generation older than the current one"
    else:
        target = next((g for g in machine.generations if g.number == generation), None)
        missing = f"generation {generation} does not exist"
    if target is None or target.system is None:
        yield report.stop(f"rollback: {missing}")
        return
    report.outcome(host.name).system = target.system
    if target.current and machine.current_system == target.system:
        host.noop(f"{host.name} already runs generation {target.number}")
        return
    activation = Activation(
        id=uuid.uuid4().hex[:12],
        machine_class=machine_class,
        goal="switch",
        system=target.system,
        profile=nix.profile_path(machine_class, host.data.get("ssh_user") or "root"),
        confirm_timeout=confirm_timeout,
        base=state_dir(host.data),
        generation=target.number,
    )
    yield FunctionCommand(_activate, (activation,), {})


def _activate(state: Any, host: Any, activation: Activation) -> bool:
    """Launch the worker and wait for its outcome, reconnecting if the connection breaks."""
    if _stopped:
        report.failed(host.name, f"not activated: the rollout stopped ({_stopped[0]})")
        return False
    try:
        phase, message = _ask(host, activation.launch_command(), stdin=WORKER)
    except Unreachable as error:
        # The worker goes on without us: wait for it over new connections, and give pyinfra
        # a new connection too, as its own was most likely cut at the same time.
        report.note(host.name, f"connection lost during activation ({error}); reconnected")
        phase, message = _wait(host, activation, ("running",))
        reconnect(host, reason="after the connection was lost")
    if phase == "missing":
        report.failed(host.name, "activation: could not start it (connection failed)")
        return False
    if phase == "awaiting-confirmation":
        _pending[host.name] = (activation, host.data)  # changed once confirmed
        return True
    if phase != "succeeded":
        report.failed(host.name, f"activation: {_loud(host, phase, message)}")
        return False
    if activation.goal != "dry-activate":
        report.changed(host.name, activation.goal)
    if message.startswith(REBOOT_REQUIRED):  # switch-to-configuration exited 100
        report.note(host.name, message)
        _awaiting_reboot.add(host.name)
    return True


def _loud(host: Any, phase: str, message: str) -> str:
    """The worker's message; a failed rollback is shouted, with where the machine stands."""
    if phase != "rollback-failed":
        return message
    try:
        running, selected = run_on(
            host.data,
            host.name,
            f"readlink -f /run/current-system; readlink -f {SYSTEM_PROFILE}",
            timeout=30,
        ).stdout.split()[:2]
    except (Unreachable, ValueError):
        return f"ROLLBACK FAILED: {message}; the machine's state could not be read"
    return (
        f"ROLLBACK FAILED: {message}; the machine runs {running} and its profile selects "
        f"{selected}: fix it by hand"
    )


def _ask(host: Any, command: str, stdin: str | None = None) -> tuple[str, str]:
    """Run a command that ends by printing `phase=...` and a message; return both."""
    completed = run_on(host.data, host.name, command, stdin=stdin, timeout=900)
    lines = completed.stdout.strip().splitlines()
    phase_lines = [line for line in lines if line.startswith("phase=")]
    if completed.returncode != 0 or not phase_lines:
        return "missing", (completed.stderr.strip() or "no answer")
    index = lines.index(phase_lines[-1])
    message = lines[index + 1] if index + 1 < len(lines) else ""
    return phase_lines[-1].removeprefix("phase="), message


def _wait(
    host: Any, activation: Activation, busy: tuple[str, ...], patience: float = 0
) -> tuple[str, str]:
    """Wait for the worker to leave the `busy` phases, over new connections as needed.

    `patience` is how long to keep trying to connect (at least the confirmation timeout, as
    the machine may only become reachable again once it has rolled itself back).
    """
    deadline = time.monotonic() + max(patience, activation.confirm_timeout + 30, 60)
    while True:
        try:
            return _ask(host, activation.wait_command(busy))
        except Unreachable as error:
            if time.monotonic() > deadline:
                return "unknown", f"{host.name} unreachable: {error}"
            time.sleep(1)


def pending(name: str) -> Activation | None:
    """The machine's activation that waits for confirmation, if any."""
    entry = _pending.get(name)
    return entry[0] if entry else None


def confirm(host: Any) -> tuple[bool, str]:
    """Confirm the machine's pending activation over a new SSH connection.

    Returns whether the machine stayed on its new system, and what happened.
    """
    activation, _ = _pending.pop(host.name)
    try:
        run_on(host.data, host.name, f"touch {activation.directory}/confirm", timeout=30)
    except Unreachable as error:
        # The new system may have broken logins: the machine rolls itself back on time.
        phase, message = _wait(host, activation, ("running", "awaiting-confirmation"))
        message = _loud(host, phase, message)
        return False, f"could not confirm over a new SSH connection ({error}); {message}"
    phase, message = _wait(host, activation, ("running", "awaiting-confirmation"))
    if phase == "succeeded":
        report.changed(host.name, activation.goal)
    return phase == "succeeded", _loud(host, phase, message)


def abort(host: Any, reason: str) -> str:
    """Have the machine roll its pending activation back now; returns what happened."""
    activation, _ = _pending.pop(host.name)
    with contextlib.suppress(Unreachable):  # if not, it rolls back by itself on time
        run_on(
            host.data,
            host.name,
            f"cat > {activation.directory}/abort.new && "
            f"mv {activation.directory}/abort.new {activation.directory}/abort",
            stdin=reason,
            timeout=30,
        )
    phase, message = _wait(host, activation, ("running", "awaiting-confirmation"))
    return _loud(host, phase, message)
