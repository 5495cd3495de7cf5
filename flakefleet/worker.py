"""The activation protocol: how the deployer and the worker on the machine talk.

The worker (``operations/scripts/activate.sh``) runs detached on the machine, in its own
directory under flakefleet's state directory (`WorkerDir`). It writes its progress there as a
`Phase` and a one-line message; the deployer reads them over any connection, and answers by
creating ``confirm`` (the checks passed, over a new SSH login) or ``abort`` (they failed; its
content is the reason). Without either within the confirmation timeout, the worker rolls the
machine back by itself.

    deployer                                   worker (on the machine)
    launch ───────────────────────────────────▶ running
                                                 ├─ failed / rolled-back / rollback-failed
                                                 ├─ succeeded            (no confirmation)
                                                 └─ awaiting-confirmation
    confirm (new SSH login) ──────────────────▶    ├─ succeeded
    abort (reason) ───────────────────────────▶    └─ rolled-back / rollback-failed
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from enum import StrEnum

from flakefleet.models import Goal, MachineClass


class Phase(StrEnum):
    """Where a worker is; it writes these to its ``phase`` file."""

    RUNNING = "running"
    AWAITING_CONFIRMATION = "awaiting-confirmation"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ROLLED_BACK = "rolled-back"
    ROLLBACK_FAILED = "rollback-failed"

    @property
    def busy(self) -> bool:
        """Whether the worker still has something to do (the machine is in its hands)."""
        return self in BUSY


BUSY = (Phase.RUNNING, Phase.AWAITING_CONFIRMATION)


class Unanswered(StrEnum):
    """What the deployer knows when no phase could be read: not the worker's own words."""

    NOT_STARTED = "missing"  # the launch failed: the machine is as it was
    UNREACHABLE = "unknown"  # the machine could not be asked; the worker may go on


class _File:
    """A file of the protocol, as a path in the worker's directory."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, directory: WorkerDir, owner: type) -> str:
        return f"{directory.path}/{self.name}"


@dataclass(frozen=True)
class WorkerDir:
    """A worker's directory on the machine and the files of the protocol in it."""

    path: str

    script = _File("activate.sh")  # the worker itself, sent with the launch
    phase = _File("phase")  # a Phase, replaced atomically
    message = _File("message")  # one line saying why
    log = _File("log")  # everything the worker and the activation printed
    confirm = _File("confirm")  # made by the deployer: keep the new system
    abort = _File("abort")  # made by the deployer: roll back; holds the reason


def busy_count_command(state_dir: str) -> str:
    """Print how many workers on the machine are still busy (for the preflight)."""
    phases = " ".join(f"-e {phase}" for phase in BUSY)
    return f"cat {state_dir}/activation/*/phase 2>/dev/null | grep -c -x {phases}"


@dataclass(frozen=True)
class Activation:
    """One activation of one machine, as the worker on the machine knows it."""

    id: str
    machine_class: MachineClass
    goal: Goal
    system: str
    profile: str
    confirm_timeout: float
    state_dir: str  # flakefleet's runtime directory on the machine (Target.state_dir)
    generation: int | None = None  # switch the profile to this existing generation (rollback)

    @property
    def directory(self) -> WorkerDir:
        return WorkerDir(f"{self.state_dir}/activation/{self.id}")

    def arguments(self) -> list[str]:
        """The worker's command line: named options, as `activate.sh --help` lists them."""
        arguments = [
            "/bin/sh", self.directory.script,
            "--dir", self.directory.path,
            "--class", str(self.machine_class),
            "--goal", str(self.goal),
            "--system", self.system,
            "--profile", self.profile,
            "--confirm-timeout", str(int(self.confirm_timeout)),
        ]  # fmt: skip
        if self.generation is not None:
            arguments += ["--generation", str(self.generation)]
        return arguments

    def launch_command(self) -> str:
        """Start the worker detached (script on stdin), then wait for it to leave `running`."""
        directory = self.directory
        arguments = shlex.join(self.arguments())
        unit = f"flakefleet-activation-{self.id}"
        return (
            f"mkdir -p {directory.path} && cat > {directory.script} && "
            "if [ -d /run/systemd/system ] && command -v systemd-run >/dev/null; then "
            f"systemd-run --unit={unit} --collect --quiet -- {arguments}; "
            f"else setsid nohup {arguments} </dev/null >/dev/null 2>&1 & fi; "
            + self.wait_command((Phase.RUNNING,))
        )

    def wait_command(self, busy: tuple[Phase, ...], seconds: int = 600) -> str:
        """Wait while the worker's phase is one of `busy`; print `phase=...` and the message."""
        directory = self.directory
        phase = directory.phase
        waiting = " || ".join(f'[ "$(cat {phase})" = {p} ]' for p in busy)
        return (
            f"i=0; while [ -d {directory.path} ] && {{ [ ! -e {phase} ] || {waiting}; }} "
            f"&& [ $i -lt {seconds * 10} ]; do sleep 0.1; i=$((i + 1)); done; "
            f'if [ -e {phase} ]; then echo "phase=$(cat {phase})"; cat {directory.message}; '
            f"else echo phase={Unanswered.NOT_STARTED}; fi"
        )

    def confirm_command(self) -> str:
        return f"touch {self.directory.confirm}"

    def abort_command(self) -> str:
        """Ask the worker to roll back; the reason comes on standard input."""
        abort = self.directory.abort
        return f"cat > {abort}.new && mv {abort}.new {abort}"


def parse_answer(returncode: int, stdout: str, stderr: str) -> tuple[Phase | Unanswered, str]:
    """The phase and message a launch or wait command printed (`phase=...`, then a line)."""
    lines = stdout.strip().splitlines()
    phase_lines = [line for line in lines if line.startswith("phase=")]
    if returncode != 0 or not phase_lines:
        return Unanswered.NOT_STARTED, (stderr.strip() or "no answer")
    index = lines.index(phase_lines[-1])
    message = lines[index + 1] if index + 1 < len(lines) else ""
    word = phase_lines[-1].removeprefix("phase=")
    known = {str(each): each for each in [*Phase, *Unanswered]}
    return known.get(word, Phase.FAILED), message
