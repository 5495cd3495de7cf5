"""The activation protocol: how the deployer and the worker on the machine talk.

The worker (``operations/scripts/activate.sh``) runs detached on the machine, in its own
directory under flakefleet's state directory (`WorkerDir`). It writes its progress there as a
`Phase` and a one-line message; the deployer reads them over any connection, and answers by
creating ``confirm`` (the checks passed, over a new SSH login) or ``abort`` (they failed; its
content is the reason). Without either within the confirmation timeout, the worker rolls the
machine back by itself. ``hold`` (over a new SSH login too) starts that timeout again: the
deployer makes it while the machine's checks cannot begin yet (see `operations.activation`).

    deployer                                   worker (on the machine)
    launch ───────────────────────────────────▶ running
                                                 ├─ failed / rolled-back / rollback-failed
                                                 ├─ succeeded            (no confirmation)
                                                 └─ awaiting-confirmation
    hold (new SSH login) ─────────────────────▶    │  (the timeout starts again)
    confirm (new SSH login) ──────────────────▶    ├─ succeeded
    abort (reason) ───────────────────────────▶    └─ rolled-back / rollback-failed
"""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from flakefleet.models import Goal, MachineClass
from flakefleet.target import Target, Unreachable, shell_path

# How long a launched worker may take to write its PID before it is taken for never started.
START_SECONDS = 30


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
    """What the deployer knows when the worker cannot say: not the worker's own words."""

    NOT_STARTED = "missing"  # the launch failed: the machine is as it was
    UNREACHABLE = "unknown"  # the machine could not be asked; the worker may go on
    GONE = "gone"  # its phase is busy but the worker is dead (killed, out of memory)


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
    hold = _File("hold")  # made by the deployer: the confirmation timeout starts again
    pid = _File("pid")  # the worker's process, written before its first phase


# `alive DIR`: whether the worker of DIR still runs (its process's command line names DIR:
# a reused PID does not). `ps -ww -o args=` (whole, whatever COLUMNS says) is the same on
# Linux and macOS.
ALIVE = (
    'alive() { p=; { read -r p < "$1/pid"; } 2>/dev/null; [ -n "$p" ] && '
    'ps -ww -p "$p" -o args= 2>/dev/null | grep -qF -- "$1"; }'
)
# `busy DIR`: whether the worker of DIR is in a busy phase.
BUSY_PHASE = (
    'busy() { case "$(cat "$1/phase" 2>/dev/null)" in '
    + "|".join(BUSY)
    + ") return 0 ;; esac; return 1; }"
)


def workers_command(state_dir: str) -> str:
    """For the preflight, print `workers BUSY DEAD`: how many workers are busy and alive, and
    how many died in a busy phase (those are marked failed: the deploy may take over)."""
    return (
        f"{ALIVE}; {BUSY_PHASE}; b=0; d=0; for w in {state_dir}/activation/*; do "
        '[ -d "$w" ] && busy "$w" || continue; '
        'if alive "$w"; then b=$((b + 1)); else d=$((d + 1)); '
        f'echo {Phase.FAILED} > "$w/phase"; '
        'echo "the worker died (killed, or out of memory)" > "$w/message"; fi; '
        'done; echo "workers $b $d"'
    )


@dataclass(frozen=True)
class Activation:
    """One activation of one machine, as the worker on the machine knows it."""

    id: str
    machine_class: MachineClass
    goal: Goal
    system: str
    profile: str
    running: str  # what links to the system the machine runs (Target.running_link)
    confirm_timeout: float
    state_dir: str  # flakefleet's runtime directory on the machine (Target.state_dir)
    user: str = "root"  # the SSH user (nix-darwin's legacy activate-user runs as them)
    generation: int | None = None  # switch the profile to this existing generation (rollback)
    sources_undo: str | None = None  # what this run's sync replaced in /var/src (to put back)
    sources_root: str | None = None  # /var/src: a kept generation remembers its trees there
    record: str | None = None  # the machine's deploy history (Target.history)
    record_base: str = ""  # the deployer's fields of the record (`records.deployer_fields`)

    @classmethod
    def on(
        cls, target: Target, goal: Goal, system: str, confirm_timeout: float, **more: Any
    ) -> Activation:
        """A new activation of `system` on the machine `target` reaches (`more`: a rollback's
        `generation`, the sources' `sources_root` and `sources_undo`, `record_base`)."""
        return cls(
            id=uuid.uuid4().hex[:12],
            machine_class=target.machine_class,
            goal=goal,
            system=system,
            profile=target.profile,
            running=target.running_link,
            confirm_timeout=confirm_timeout,
            state_dir=target.state_dir,
            record=target.history,
            user=target.user,
            **more,
        )

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
            "--running", self.running,
            "--confirm-timeout", str(int(self.confirm_timeout)),
            "--user", self.user,
        ]  # fmt: skip
        if self.generation is not None:
            arguments += ["--generation", str(self.generation)]
        if self.sources_root is not None:
            arguments += ["--sources", self.sources_root]
        if self.sources_undo is not None:
            arguments += ["--sources-undo", self.sources_undo]
        if self.record is not None:
            arguments += ["--record", self.record, "--record-base", self.record_base]
        return arguments

    def launch_command(self) -> str:
        """Start the worker detached (script on stdin), then wait for it to leave `running`.

        As root where systemd runs, a transient unit (out of the SSH session's cgroup, so an
        sshd restart by the new system cannot take it along); a unit's environment is
        systemd's own (on NixOS, PATH is only systemd's bin directory), so the session's PATH
        goes with it. Elsewhere (a user's login, a Mac without setsid) a process of its own
        that ignores the session's hangup.
        """
        directory = self.directory
        arguments = " ".join(map(shell_path, self.arguments()))  # a user's profile expands
        unit = f"flakefleet-activation-{self.id}"
        detach = (
            "detach() { if command -v setsid >/dev/null; then "
            'setsid nohup "$@" </dev/null >/dev/null 2>&1 & '
            'else nohup "$@" </dev/null >/dev/null 2>&1 & fi; }'
        )
        return (
            f"{detach}; mkdir -p {directory.path} && cat > {directory.script} && "
            'if [ "$(id -u)" = 0 ] && [ -d /run/systemd/system ] && '
            "command -v systemd-run >/dev/null; then "
            f'systemd-run --unit={unit} --collect --quiet --setenv=PATH="$PATH" -- {arguments} '
            f"|| detach {arguments}; else detach {arguments}; fi; "
            + self.wait_command((Phase.RUNNING,))
        )

    def wait_command(self, busy: tuple[Phase, ...], seconds: int = 600) -> str:
        """Wait while the worker's phase is one of `busy`; print `phase=...` and the message.

        Not started yet: wait, unless it never started (no PID within START_SECONDS: the
        command that detaches it failed) or is gone already (it died before its first phase).
        Busy: wait while it is alive. A tick costs the machine one process (`sleep`): the
        files are read with the shell's `read`, the worker is looked at with `kill -0`, and
        `alive` (`ps`, which tells a reused PID or a zombie from the worker) runs once a
        second. (Every tick used to cost five: 50 a second on each machine while it
        activated, which a fleet of test machines sharing two cores felt.)
        """
        directory = self.directory
        path, phase, pid = directory.path, directory.phase, directory.pid
        waiting = "|".join(busy)
        return (
            f"{ALIVE}; i=0; wp=; while [ -d {path} ] && [ $i -lt {seconds * 10} ]; do "
            f"ph=; [ -e {phase} ] && read -r ph < {phase}; "
            f'[ -n "$wp" ] || {{ [ -e {pid} ] && read -r wp < {pid}; }}; '
            f'if [ -z "$ph" ] && [ -z "$wp" ]; then [ $i -lt {START_SECONDS * 10} ] || break; '
            f'elif [ -z "$ph" ]; then kill -0 "$wp" 2>/dev/null || break; '
            f'else case "$ph" in {waiting}) ;; *) break ;; esac; '
            f'kill -0 "$wp" 2>/dev/null || break; fi; '
            f'[ $((i % 10)) -ne 9 ] || [ -z "$wp" ] || alive {path} || break; '
            "sleep 0.1; i=$((i + 1)); done; "
            f"ph=; [ -e {phase} ] && read -r ph < {phase}; "
            f"if [ ! -e {phase} ] && [ -e {directory.pid} ] && ! alive {path}; then "
            f'echo "phase={Unanswered.GONE}"; echo "the activation worker died as it started"; '
            f'elif [ ! -e {phase} ]; then echo "phase={Unanswered.NOT_STARTED}"; '
            "echo 'the activation worker did not start'; "
            f'elif case "$ph" in {waiting}) true ;; *) false ;; esac && ! alive {path}; then '
            f'echo "phase={Unanswered.GONE}"; '
            "echo 'the activation worker died (killed, or out of memory)'; "
            f'else echo "phase=$ph"; cat {directory.message}; fi'
        )

    def confirm_command(self) -> str:
        return f"touch {self.directory.confirm}"

    def hold_command(self) -> str:
        return f"touch {self.directory.hold}"

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


# -- the deployer's half ------------------------------------------------------------------------

Answer = tuple[Phase | Unanswered, str]


def ask(target: Target, command: str, stdin: str | None = None) -> Answer:
    """Run a launch or wait command over a new connection; the phase and message it printed."""
    completed = target.run(command, stdin=stdin, timeout=900)
    return parse_answer(completed.returncode, completed.stdout, completed.stderr)


def wait(target: Target, activation: Activation, busy: tuple[Phase, ...]) -> Answer:
    """Wait for the worker to leave the `busy` phases, over new connections as needed.

    Keeps trying to connect for at least the confirmation timeout, as the machine may only
    become reachable again once it has rolled itself back.
    """
    deadline = time.monotonic() + max(activation.confirm_timeout + 30, 60)
    while True:
        try:
            return ask(target, activation.wait_command(busy))
        except Unreachable as error:
            if time.monotonic() > deadline:
                return Unanswered.UNREACHABLE, f"{target.name} unreachable: {error}"
            time.sleep(1)


def abort(target: Target, activation: Activation, reason: str) -> Answer:
    """Have the worker roll back now (or as soon as it reaches the confirmation wait); the
    answer once it is done. Unreachable, it rolls back by itself on time."""
    with contextlib.suppress(Unreachable):
        target.run(activation.abort_command(), stdin=reason, timeout=30)
    return wait(target, activation, BUSY)


def systems(target: Target) -> tuple[str, str]:
    """What the machine runs and what its profile selects ("nothing" for a missing link);
    raises Unreachable."""
    script = "; ".join(
        f"if [ -e {link} ]; then readlink -f {link}; else echo nothing; fi"
        for link in map(shell_path, (target.running_link, target.profile))
    )
    running, selected = target.run(script, timeout=30).stdout.split()[:2]
    return running, selected


def explain(target: Target, answer: Answer) -> str:
    """The worker's message; a failed rollback is shouted and a dead worker explained, with
    where the machine stands."""
    phase, message = answer
    if phase not in (Phase.ROLLBACK_FAILED, Unanswered.GONE):
        return message
    loud = "ROLLBACK FAILED: " if phase is Phase.ROLLBACK_FAILED else ""
    try:
        running, selected = systems(target)
    except (Unreachable, ValueError):
        return f"{loud}{message}; the machine's state could not be read"
    return f"{loud}{message}; the machine runs {running} and its profile selects {selected}" + (
        ": fix it by hand" if loud else ""
    )
