"""Local processes (flakefleet.process): a command fed its input while it starts up."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from flakefleet.process import run_fed

# Marks that it started, then reads the descriptor it is given to the end and prints the size.
READER = """
import os, sys
open(sys.argv[2], "w").close()
size = 0
while chunk := os.read(int(sys.argv[1]), 1 << 20):
    size += len(chunk)
print(size)
"""


def test_the_command_starts_before_its_input_is_made(tmp_path: Path):
    started = tmp_path / "started"

    def feed() -> bytes:
        deadline = time.monotonic() + 30
        while not started.exists():  # the command runs while its input is being made
            assert time.monotonic() < deadline, "the command did not start before the feed ended"
            time.sleep(0.01)
        return b"x" * 3_000_000  # more than a pipe holds: written as the command reads

    done = run_fed(lambda fd: [sys.executable, "-c", READER, str(fd), str(started)], feed)
    assert (done.returncode, done.stdout.strip()) == (0, "3000000")


def test_a_command_that_reads_nothing_is_no_error():
    done = run_fed(lambda fd: [sys.executable, "-c", "print('done')"], lambda: b"x" * 3_000_000)
    assert (done.returncode, done.stdout) == (0, "done\n")


def test_a_command_past_its_timeout_is_killed():
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_fed(lambda fd: ["sleep", "30"], lambda: b"", timeout=0.5)
    assert time.monotonic() - started < 10
