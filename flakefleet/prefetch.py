"""A machine's smoke-check commands in one round trip.

pytest-testinfra sends each command a check asks (`host.file(...)`, `host.socket(...)`,
`host.run(...)`) as an SSH command of its own: a round trip each, 7 to 12 per machine for the
example's suites. The checks ask the same commands run after run, so the commands a machine's
checks asked are recorded (`.flakefleet/checks/<fleet>/<machine>.json`), and at the first
command of the next run they all run on the machine in one script, in the order they were
asked then; each command is then answered from that script's output, once. A command the
script did not run (a new check, or one whose text depends on an answer that changed) runs on
its own, as before: the batch saves round trips, and never answers with anything but this
run's output.

Example (how the smoke suites' conftest uses it)::

    batch = Prefetch(Prefetch.recorded(directory, "web1"))
    answer = batch.answer(command, send)  # `send(script) -> (status, stdout, stderr)`
    ...
    batch.record(directory, "web1")
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

from flakefleet.fleet import fleet_state_name
from flakefleet.sources.model import STATE_DIR

Answer = tuple[int, bytes, bytes]  # exit status, standard output, standard error
Send = Callable[[str], Answer]

MAX_COMMANDS = 200  # a record longer than this is a loop, not a suite: it is not kept


def records(fleet_file: Path) -> Path:
    """Where the checks of a fleet file's machines are recorded, under the directory the checks
    run from: a directory per fleet file, as two fleets may both have a `web1`."""
    return Path(STATE_DIR) / "checks" / fleet_state_name(fleet_file)


def processes_for(directory: Path, machines: Sequence[str], most: int) -> int:
    """How many pytest processes check `machines`: one when every machine's checks are
    recorded in `directory` (that process sends all their batches at once, and a second one
    would only add its start-up), else up to `most`, which overlap the round trips of checks
    asked one by one."""
    if all(Prefetch.recorded(directory, machine) for machine in machines):
        return 1
    return most


def batch_script(commands: Sequence[str]) -> str:
    """One POSIX shell script running `commands` in order, each in a subshell of its own with
    no standard input, printing for each ``<status> <stdout bytes> <stderr bytes>`` on a line
    and then both outputs (see `parse_batch`)."""
    lines = ["d=$(mktemp -d) || exit 97", "trap 'rm -rf \"$d\"' EXIT"]
    for command in commands:
        lines += [
            f'(\n{command}\n) </dev/null >"$d/o" 2>"$d/e"; s=$?',
            'printf \'%s %s %s\\n\' "$s" $(wc -c <"$d/o") $(wc -c <"$d/e"); cat "$d/o" "$d/e"',
        ]
    return "\n".join(lines)


def parse_batch(output: bytes, count: int) -> list[Answer]:
    """The answers `batch_script` printed for its first `count` commands (fewer if it was cut
    short: those it lacks run on their own)."""
    answers: list[Answer] = []
    at = 0
    while len(answers) < count:
        end = output.find(b"\n", at)
        header = output[at:end].split() if end >= 0 else []
        if len(header) != 3 or not all(part.isdigit() for part in header):
            break
        status, out_size, err_size = (int(part) for part in header)
        start = end + 1
        if start + out_size + err_size > len(output):
            break
        stdout = output[start : start + out_size]
        stderr = output[start + out_size : start + out_size + err_size]
        answers.append((status, stdout, stderr))
        at = start + out_size + err_size
    return answers


class Prefetch:
    """One machine's check commands: the recorded ones run in one batch at the first command,
    the others one by one; what was asked, in order, is recorded for the next run."""

    def __init__(self, expected: Sequence[str]) -> None:
        self.expected = list(expected)
        self.asked: list[str] = []
        self._answers: dict[str, deque[Answer]] | None = None
        self.round_trips = 0

    @staticmethod
    def recorded(directory: Path, machine: str) -> list[str]:
        """The commands the machine's checks asked last time ([] if none were recorded)."""
        try:
            found = json.loads((directory / f"{machine}.json").read_text())
        except (OSError, ValueError):
            return []
        if not isinstance(found, list) or not all(isinstance(c, str) for c in found):
            return []
        return found

    def record(self, directory: Path, machine: str) -> None:
        # Unchanged, it is not written again: replacing a file costs a disk flush on ext4.
        if not self.asked or len(self.asked) > MAX_COMMANDS or self.asked == self.expected:
            return
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{machine}.json"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.asked, indent=0) + "\n")
        temporary.replace(path)

    def answer(self, command: str, send: Send) -> Answer:
        """The answer to `command`: from the batch if it ran it and that answer is unused, else
        sent on its own. `send` sends a script to the machine and returns its answer."""
        self.asked.append(command)
        if self._answers is None:
            script = self.script()
            if script is None:
                self._answers = {}
            else:
                self.take(send(script))
        waiting = self._answers.get(command)
        if waiting:
            return waiting.popleft()
        self.round_trips += 1
        return send(command)

    def script(self) -> str | None:
        """The batch to send, if there is one and it has not run."""
        return batch_script(self.expected) if self.expected and self._answers is None else None

    def take(self, answer: Answer) -> None:
        """The machine's answer to `script()`, however it was sent: a caller with many machines
        sends theirs at once, so their round trips overlap instead of adding up."""
        self.round_trips += 1
        status, output, _ = answer
        self._answers = {}
        if status == 97:  # no temporary directory on the machine: every command on its own
            return
        found = parse_batch(output, len(self.expected))  # fewer if the script was cut short
        for command, each in zip(self.expected, found, strict=False):
            self._answers.setdefault(command, deque()).append(each)
