"""Benchmark: the walking skeleton's deploy against the by-hand floor, on a test fleet.

    .venv/bin/python bench/deploy.py [--machines N] [--runs R]

Measures, on a fleet of its own (.testbed-bench/, ports 229xx or $FLAKEFLEET_BENCH_PORT):
- the first deploy of the example flake to empty machines, beside the same work done by hand
  (rsync the flake, one `nix build`, `nix copy`, `ssh ... switch-to-configuration`, all
  machines in parallel);
- the no-op redeploy, beside `pyinfra inventory.py exec -- true` on the same machines;
- SSH sessions (commands) each machine's sshd started during the no-op redeploy, split into
  the deploy's own and the smoke checks'.
Timings vary on a shared machine: each figure is the median of R runs.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import time

from common import BIN, NIX, ROOT, fleet_env, run_checked
from common import testbed as fleet_testbed

from testbed.layout import StatePaths

STATE = ROOT / ".testbed-bench"
# Its own ports (another fleet on this computer may use 229xx: set $FLAKEFLEET_BENCH_PORT).
ENV = fleet_env(STATE, int(os.environ.get("FLAKEFLEET_BENCH_PORT") or 22900))


def sh(*argv: str, env: dict[str, str] | None = None) -> str:
    return run_checked(*argv, env=env or ENV)


def testbed(*args: str) -> str:
    return fleet_testbed(ENV, *args)


# `nix build --json` to its output paths (Nix 2.8 has no --print-out-paths).
OUT_PATHS = (
    "python3 -c 'import json, sys; "
    'print(" ".join(o["outputs"]["out"] for o in json.load(sys.stdin)))\''
)


def timed(*argv: str) -> float:
    start = time.monotonic()
    sh(*argv)
    return time.monotonic() - start


def fresh_fleet(machines: int) -> list[str]:
    testbed("down", "--purge")
    testbed("up", "--machines", str(machines))
    return [line.split()[0] for line in testbed("status").splitlines()]


def sessions(machines: list[str]) -> dict[str, int]:
    """SSH sessions each machine's sshd started so far (namespace and systemd machines)."""
    return {name: StatePaths(STATE).machine(name).ssh_sessions() for name in machines}


def deploy(*args: str) -> float:
    return timed(str(BIN / "pyinfra"), "-y", "inventory.py", "deploy/site.py", *args)


def by_hand(machines: list[str]) -> float:
    """The first deploy's work with plain tools: what flakefleet's pipeline does, minus checks."""
    config = str(STATE / "ssh_config")
    flake = ROOT / "example"
    attributes = [
        f"path:{flake}#nixosConfigurations.{name}.config.system.build.toplevel" for name in machines
    ]
    script = f"""
set -e
paths=$({shlex.join(NIX)} build --no-link --json {" ".join(attributes)} | {OUT_PATHS})
set -- $paths
for name in {" ".join(machines)}; do
  path=$1; shift
  (
    ssh -F {config} $name mkdir -p /var/src
    rsync -a --delete --exclude=/.git -e "ssh -F {config}" {flake}/ $name:/var/src/config/
    NIX_SSHOPTS="-F {config}" nix --extra-experimental-features nix-command \
      copy --to ssh://$name $path
    ssh -F {config} $name "nix-env -p /nix/var/nix/profiles/system --set $path \
      && $path/bin/switch-to-configuration switch"
  ) &
done
wait
"""
    return timed("bash", "-c", script)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machines", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    first, hand, noop, noop_serial, noop_unchecked, floor = [], [], [], [], [], []
    try:
        for _ in range(args.runs):
            machines = fresh_fleet(args.machines)
            hand.append(by_hand(machines))
            machines = fresh_fleet(args.machines)
            first.append(deploy())
        for _ in range(args.runs):
            before = sessions(machines)
            noop.append(deploy())
            after = sessions(machines)
            noop_serial.append(deploy("--data", "smoke_check_processes=1"))
            # goal=boot is also a no-op after a switch, and runs no smoke checks.
            noop_unchecked.append(deploy("--data", "goal=boot"))
            floor.append(timed(str(BIN / "pyinfra"), "-y", "inventory.py", "exec", "--", "true"))
        per_machine = {name: after[name] - before[name] for name in machines}
        # The smoke checks alone, as the deploy runs them (it says which system to expect).
        running = [line.split() for line in testbed("status").splitlines()]
        expect = [f"--expect-system={name}={system}" for name, _, _, system in running]
        before = sessions(machines)
        sh(str(BIN / "pytest"), "-q", "-p", "no:cacheprovider", "tests/smoke",
           "--fleet", ENV["FLAKEFLEET_FLEET"], *expect)  # fmt: skip
        smoke = {name: count - before[name] for name, count in sessions(machines).items()}
    finally:
        testbed("down", "--purge")

    def median(values: list[float]) -> float:
        return statistics.median(values)

    print(f"flakefleet deploy benchmark: {args.machines} machines, median of {args.runs} runs")
    print(f"{'':34}{'flakefleet':>12}{'floor':>10}{'ratio':>8}")
    rows = [
        ("first deploy (by hand: rsync, nix)", median(first), median(hand)),
        ("no-op redeploy (floor: exec true)", median(noop), median(floor)),
        ("  smoke checks in one process", median(noop_serial), median(floor)),
        ("  the same without smoke checks", median(noop_unchecked), median(floor)),
    ]
    for label, ours, base in rows:
        print(f"{label:34}{ours:>11.2f}s{base:>9.2f}s{ours / base:>7.1f}x")
    print("SSH commands per machine during the no-op redeploy (deploy + smoke checks):")
    for name in machines:
        total = per_machine[name]
        print(f"  {name:10} {total:3}  = {total - smoke[name]} deploy + {smoke[name]} smoke checks")


if __name__ == "__main__":
    main()
