"""Smoke-check commands batched into one round trip (flakefleet.prefetch), with a real shell
standing in for the machine's: each answer must be what the command alone would have said."""

from __future__ import annotations

import subprocess
from pathlib import Path

from flakefleet.fleet import parse_fleet
from flakefleet.prefetch import (
    Prefetch,
    batch_script,
    expected,
    parse_batch,
    processes_for,
    records,
    unpredicted,
)

FLEET = parse_fleet(
    {
        "machines": [
            {"name": n, "address": "127.0.0.1", "port": 22400 + i, "roles": [role], **more}
            for i, (n, role, more) in enumerate(
                [
                    ("web1", "web", {"data": {"service_port": 18081}}),
                    ("web2", "web", {"data": {"service_port": 18082, "note": ""}}),
                    ("web3", "web", {"data": {"service_port": 18083}}),
                    ("db1", "db", {}),
                    ("mac1", "web", {"class": "darwin"}),
                ]
            )
        ]
    },
    Path("fleet.yaml"),
)


def recorded(directory: Path, machine: str, commands: list[str]) -> None:
    batch = Prefetch([])
    for command in commands:
        batch.answer(command, lambda script: (0, b"", b""))
    batch.record(directory, machine)


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


def test_an_armored_batch_carried_as_text_lines_answers_as_alone():
    """Over pyinfra's connection, which hands back decoded lines: the outputs in base64."""
    commands = [*COMMANDS, "printf '\\377\\r\\n\\n'"]  # not UTF-8, a carriage return, blank lines
    _, output, _ = alone(batch_script(commands, armored=True))
    as_lines = "\n".join(output.decode().splitlines()).encode()
    assert parse_batch(as_lines, len(commands), armored=True) == [alone(c) for c in commands]
    batch = Prefetch(commands)
    batch.take((0, as_lines, b""), armored=True)
    assert batch.script() is None and batch.answer(commands[-1], alone) == alone(commands[-1])


def test_a_batch_cut_short_answers_nothing_and_its_commands_run_alone():
    status, output, _ = alone(batch_script(COMMANDS))
    assert status == 0
    assert len(parse_batch(output, len(COMMANDS))) == len(COMMANDS)
    for cut in (12, output.index(b"total"), len(output) - 1):
        assert parse_batch(output[:cut], len(COMMANDS)) == []
    assert parse_batch(b"ssh: connect refused\n", 3) == []
    assert parse_batch(output, len(COMMANDS) + 1) == []  # not the script for these commands

    sent: list[str] = []

    def cut_short(script: str) -> tuple[int, bytes, bytes]:
        sent.append(script)
        status, output, error = alone(script)
        return (status, output[:-1], error) if len(sent) == 1 else (status, output, error)

    batch = Prefetch(COMMANDS)
    assert [batch.answer(command, cut_short) for command in COMMANDS] == [
        alone(c) for c in COMMANDS
    ]
    assert len(sent) == 1 + len(COMMANDS)


def test_a_batch_costs_the_machine_four_processes_beside_its_commands(tmp_path: Path):
    """Each command runs in a subshell; beside them, one `mktemp`, one `wc`, one `cat` and one
    `rm`, whatever the number of commands (the statuses are echoed by the shell itself)."""
    counted = tmp_path / "bin"
    counted.mkdir()
    log = tmp_path / "log"
    for program in ("wc", "cat", "mktemp", "rm"):
        real = subprocess.run(["sh", "-c", f"command -v {program}"], capture_output=True, text=True)
        wrapper = counted / program
        wrapper.write_text(f'#!/bin/sh\necho {program} >> {log}\nexec {real.stdout.strip()} "$@"\n')
        wrapper.chmod(0o755)
    commands = [f"echo {number}" for number in range(20)]
    script = f"PATH={counted}:$PATH\n" + batch_script(commands)
    status, output, _ = alone(script)
    assert status == 0
    assert [answer[1] for answer in parse_batch(output, 20)] == [
        f"{n}\n".encode() for n in range(20)
    ]
    assert sorted(log.read_text().split()) == ["cat", "mktemp", "rm", "wc"]


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
    assert processes_for(tmp_path, FLEET, ["web1", "db1"], 4) == 1
    assert processes_for(tmp_path, FLEET, ["web1", "web2", "db1"], 4) == 1  # web2: web1's
    assert processes_for(tmp_path, FLEET, ["web1", "db1", "mac1"], 4) == 4  # mac1's: none


def test_a_new_machine_batches_what_its_kin_asked_less_what_names_that_kin(tmp_path: Path):
    recorded(
        tmp_path,
        "web1",
        [
            "uname -s",
            "cat /etc/fleet-release",
            "curl http://127.0.0.1:18081/",  # web1's service_port
            "grep web1 /etc/hosts",  # web1's name
            "ssh-keyscan -p 22400 localhost",  # web1's port
        ],
    )
    assert expected(tmp_path, FLEET, "web2") == ["uname -s", "cat /etc/fleet-release"]
    assert expected(tmp_path, FLEET, "mac1") == []  # another class: other suites
    assert expected(tmp_path, FLEET, "db1") == []  # another role
    assert expected(tmp_path, FLEET, "web1")[2] == "curl http://127.0.0.1:18081/"  # its own
    assert expected(tmp_path, FLEET, "nowhere") == []

    # What web2's checks asked is recorded as its own, even when it is all it borrowed.
    borrowing = Prefetch(expected(tmp_path, FLEET, "web2"))
    for command in borrowing.expected:
        borrowing.answer(command, alone)
    borrowing.record(tmp_path, "web2")
    assert Prefetch.recorded(tmp_path, "web2") == ["uname -s", "cat /etc/fleet-release"]
    # Lent by web2, whose data has an empty value: no command names it by that.
    (tmp_path / "web1.json").unlink()
    assert expected(tmp_path, FLEET, "web3") == ["uname -s", "cat /etc/fleet-release"]


def test_a_first_deploy_checks_one_machine_of_each_kin_first(tmp_path: Path):
    machines = ["web1", "web2", "web3", "db1", "mac1"]
    assert unpredicted(tmp_path, FLEET, machines) == ["web1", "db1", "mac1"]
    recorded(tmp_path, "web1", ["uname -s"])
    assert unpredicted(tmp_path, FLEET, machines) == ["db1", "mac1"]
    assert unpredicted(tmp_path, FLEET, ["web2", "web3"]) == []


def test_two_fleet_files_keep_their_records_apart(tmp_path: Path):
    staging, production = tmp_path / "staging" / "fleet.yaml", tmp_path / "fleet.yaml"
    assert records(staging) != records(production)
    assert records(staging).parts[:2] == (".flakefleet", "checks")
