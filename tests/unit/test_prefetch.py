"""Smoke-check commands batched into one round trip (flakefleet.prefetch), with a real shell
standing in for the machine's: each answer must be what the command alone would have said."""

from __future__ import annotations

import subprocess
from pathlib import Path

from flakefleet.prefetch import Prefetch, batch_script, parse_batch, processes_for, records


def alone(script: str) -> tuple[int, bytes, bytes]:
    done = subprocess.run(["sh", "-c", script], capture_output=True, stdin=subprocess.DEVNULL)
    return done.returncode, done.stdout, done.stderr


COMMANDS = [
    "echo one",
    "printf 'two\\n' >&2; exit 3",
    "cat",  # no standard input: it ends at once
    "printf 'no newline'",
    "head -c 300 /dev/zero",  # bytes, not lines
    "exit 0 # a comment that would swallow a closing parenthesis",
]


def test_recorded_commands_are_answered_from_one_round_trip_as_alone():
    sent: list[str] = []

    def send(script: str) -> tuple[int, bytes, bytes]:
        sent.append(script)
        return alone(script)

    batch = Prefetch(COMMANDS)
    assert [batch.answer(command, send) for command in COMMANDS] == [alone(c) for c in COMMANDS]
    assert len(sent) == 1 and batch.round_trips == 1
    assert batch.answer("echo new", send) == (0, b"new\n", b"")  # not recorded: alone
    assert batch.answer("echo one", send) == (0, b"one\n", b"")  # its batch answer is used up
    assert len(sent) == 3


def test_answers_come_from_this_run_and_the_record_follows_what_was_asked(tmp_path: Path):
    state = tmp_path / "state"
    state.write_text("old")
    first = Prefetch(Prefetch.recorded(tmp_path, "web1"))  # nothing recorded: one by one
    assert first.answer(f"cat {state}", alone) == (0, b"old", b"")
    first.record(tmp_path, "web1")
    state.write_text("new")
    second = Prefetch(Prefetch.recorded(tmp_path, "web1"))
    assert second.expected == [f"cat {state}"]
    assert second.answer(f"cat {state}", alone) == (0, b"new", b"")


def test_a_batch_cut_short_leaves_the_rest_to_run_alone():
    status, output, _ = alone(batch_script(COMMANDS))
    assert status == 0
    assert len(parse_batch(output, len(COMMANDS))) == len(COMMANDS)
    assert len(parse_batch(output[:12], len(COMMANDS))) == 1  # "0 4 0\none\n" then cut
    assert parse_batch(b"ssh: connect refused\n", 3) == []


def test_a_batch_sent_beforehand_answers_the_checks_without_another_round_trip():
    """As the smoke suites do for many machines: every batch started first, then answered."""
    batch = Prefetch(COMMANDS)
    script = batch.script()
    assert script == batch_script(COMMANDS)
    started = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    answer = (started.wait(), started.stdout.read(), started.stderr.read())  # small outputs
    batch.take(answer)
    assert batch.script() is None  # sent: not again

    def unexpected(script: str) -> tuple[int, bytes, bytes]:
        raise AssertionError(f"sent again: {script}")

    assert [batch.answer(command, unexpected) for command in COMMANDS] == [
        alone(c) for c in COMMANDS
    ]
    assert batch.round_trips == 1
    assert Prefetch([]).script() is None  # nothing recorded: nothing to send


def test_an_unchanged_record_is_not_written_again(tmp_path: Path):
    first = Prefetch([])
    first.answer("echo one", alone)
    first.record(tmp_path, "web1")
    recorded = tmp_path / "web1.json"
    recorded.write_text(recorded.read_text() + " ")  # marks the file: a rewrite would drop it
    again = Prefetch(Prefetch.recorded(tmp_path, "web1"))
    again.answer("echo one", alone)
    again.record(tmp_path, "web1")
    assert recorded.read_text().endswith(" ")
    changed = Prefetch(Prefetch.recorded(tmp_path, "web1"))
    changed.answer("echo two", alone)
    changed.record(tmp_path, "web1")
    assert Prefetch.recorded(tmp_path, "web1") == ["echo two"]


def test_one_process_checks_machines_whose_checks_are_all_recorded(tmp_path: Path):
    batch = Prefetch([])
    batch.answer("echo one", alone)
    for machine in ("web1", "db1"):
        batch.record(tmp_path, machine)
    assert processes_for(tmp_path, ["web1", "db1"], 4) == 1
    assert processes_for(tmp_path, ["web1", "db1", "mac1"], 4) == 4  # mac1's are not recorded


def test_two_fleet_files_keep_their_records_apart(tmp_path: Path):
    staging, production = tmp_path / "staging" / "fleet.yaml", tmp_path / "fleet.yaml"
    assert records(staging) != records(production)
    assert records(staging).parts[:2] == (".flakefleet", "checks")
