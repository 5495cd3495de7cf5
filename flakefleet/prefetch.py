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

import base64
import json
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from flakefleet.files import write_atomically
from flakefleet.fleet import Fleet, Machine, fleet_state_name
from flakefleet.sources.model import STATE_DIR

Answer = tuple[int, bytes, bytes]  # exit status, standard output, standard error
Send = Callable[[str], Answer]

MAX_COMMANDS = 200  # a record longer than this is a loop, not a suite: it is not kept


def records(fleet_file: Path) -> Path:
    """Where the checks of a fleet file's machines are recorded, under the directory the checks
    run from: a directory per fleet file, as two fleets may both have a `web1`."""
    return Path(STATE_DIR) / "checks" / fleet_state_name(fleet_file)


def kin(fleet: Fleet, name: str) -> list[Machine]:
    """The machines the same smoke suites check as `name` (the suites select by class and role),
    in fleet order."""
    machine = fleet.machine(name)
    if machine is None:
        return []
    return [
        other
        for other in fleet.machines
        if other.machine_class == machine.machine_class
        and set(other.roles) == set(machine.roles)
        and other.name != name
    ]


def expected(directory: Path, fleet: Fleet, name: str) -> list[str]:
    """The commands to batch for machine `name`: its record, else the first recorded kin's
    without the commands that name that kin."""
    own = Prefetch.recorded(directory, name)
    machine = fleet.machine(name)
    if own or machine is None:
        return own
    for other in kin(fleet, name):
        if borrowed := Prefetch.recorded(directory, other.name):
            naming = _naming(other) - _naming(machine)
            return [command for command in borrowed if not any(n in command for n in naming)]
    return []


def _naming(machine: Machine) -> set[str]:
    """What a command could name the machine by: its name, address, port and data values."""

    def leaves(value: object) -> Iterator[str]:
        if isinstance(value, dict):
            for item in value.values():
                yield from leaves(item)
        elif isinstance(value, list | tuple):
            for item in value:
                yield from leaves(item)
        elif isinstance(value, str | int) and not isinstance(value, bool):
            yield str(value)

    found = {machine.name, machine.address, *leaves(machine.port), *leaves(machine.data)}
    return found - {""}  # an empty value is in every command


def unpredicted(directory: Path, fleet: Fleet, machines: Sequence[str]) -> list[str]:
    """One machine of each kin among `machines` that has nothing to batch: checked first, they
    record what the others then batch."""
    first: list[str] = []
    for name in machines:
        if expected(directory, fleet, name):
            continue
        if not any(other.name in first for other in kin(fleet, name)):
            first.append(name)
    return first


def processes_for(directory: Path, fleet: Fleet, machines: Sequence[str], most: int) -> int:
    """How many pytest processes check `machines`: one when every machine has commands to batch
    (that process sends all their batches at once, and a second one would only add its
    start-up), else up to `most`, which overlap the round trips of checks asked one by one."""
    if all(expected(directory, fleet, machine) for machine in machines):
        return 1
    return most


def batch_script(commands: Sequence[str], *, armored: bool = False) -> str:
    """One POSIX shell script running `commands` in order, each in a subshell of its own with
    no standard input and its outputs in files; then it prints every exit status on a line,
    every output's size (`wc -c`) and all outputs (see `parse_batch`). Four processes more
    than the commands need (mktemp, wc, cat, rm), not four a command: a fork costs a machine as
    much as a small check does.

    `armored`: the outputs in base64, for a connection that carries text lines (pyinfra's)."""
    lines = ["d=$(mktemp -d) || exit 97", "trap 'rm -rf \"$d\"' EXIT"]
    files = []
    for number, command in enumerate(commands):
        lines.append(f'(\n{command}\n) </dev/null >"$d/o{number}" 2>"$d/e{number}"; s{number}=$?')
        files += [f"o{number}", f"e{number}"]
    statuses = " ".join(f"$s{number}" for number in range(len(commands)))
    outputs = f"cat {' '.join(files)}" + (" | base64" if armored else "")
    lines += [f'echo "{statuses}"', f'cd "$d" && wc -c {" ".join(files)} && {outputs}']
    return "\n".join(lines)


def parse_batch(output: bytes, count: int, *, armored: bool = False) -> list[Answer]:
    """The answers `batch_script` printed for its `count` commands; none if the script was cut
    short (they then run on their own)."""
    # statuses, a size per output, wc's total, then the outputs
    lines = output.split(b"\n", 2 * count + 2)
    if count == 0 or len(lines) != 2 * count + 3:
        return []
    statuses = lines[0].split()
    sizes = [line.split()[:1] for line in lines[1 : 1 + 2 * count]]
    if len(statuses) != count:
        return []
    if not all(part.isdigit() for part in statuses) or not all(
        size and size[0].isdigit() for size in sizes
    ):
        return []
    rest = lines[-1]
    if armored:
        try:
            rest = base64.b64decode(rest)  # the line breaks base64 adds are skipped
        except ValueError:
            return []
    outputs, at = [], 0
    for (size,) in sizes:
        end = at + int(size)
        if end > len(rest):
            return []
        outputs.append(rest[at:end])
        at = end
    return [
        (int(status), outputs[2 * number], outputs[2 * number + 1])
        for number, status in enumerate(statuses)
    ]


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
        # Unchanged, it is not written again: replacing a file costs a disk flush on ext4. (What
        # was expected may be a kin's: the machine's own record is what must match.)
        if not self.asked or len(self.asked) > MAX_COMMANDS:
            return
        if self.asked == self.recorded(directory, machine):
            return
        write_atomically(directory / f"{machine}.json", json.dumps(self.asked, indent=0) + "\n")

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

    def script(self, *, armored: bool = False) -> str | None:
        """The batch to send, if there is one and it has not run."""
        if not self.expected or self._answers is not None:
            return None
        return batch_script(self.expected, armored=armored)

    def take(self, answer: Answer, *, armored: bool = False) -> None:
        """The machine's answer to `script()`, however it was sent: a caller with many machines
        sends theirs at once, so their round trips overlap instead of adding up."""
        self.round_trips += 1
        status, output, _ = answer
        self._answers = {}
        if status == 97:  # no temporary directory on the machine: every command on its own
            return
        found = parse_batch(output, len(self.expected), armored=armored)  # [] if cut short
        for command, each in zip(self.expected, found, strict=False):
            self._answers.setdefault(command, deque()).append(each)
