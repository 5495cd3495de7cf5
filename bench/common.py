"""What every benchmark shares: its own test fleet, and running commands against it."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NIX = ["nix", "--extra-experimental-features", "nix-command flakes", "--option", "substituters", ""]


def fleet_env(state: Path, port: int) -> dict[str, str]:
    """The environment for a benchmark's own test fleet (its state directory and ports)."""
    return {
        **os.environ,
        "FLAKEFLEET_TESTBED_STATE": str(state),
        "FLAKEFLEET_TESTBED_PORT": str(port),
        "FLAKEFLEET_FLEET": str(state / "fleet.yaml"),
    }


def run_checked(*argv: str, env: dict[str, str]) -> str:
    """Run a command from the repository root; a failure ends the benchmark with its output."""
    completed = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        sys.exit(f"bench: {shlex.join(argv)} failed:\n{completed.stdout}\n{completed.stderr}")
    return completed.stdout


def testbed(env: dict[str, str], *args: str) -> str:
    """`python -m testbed ARGS` for the fleet `env` names."""
    return run_checked(str(BIN / "python"), "-m", "testbed", *args, env=env)
