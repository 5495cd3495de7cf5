"""Benchmark: evaluating real NixOS machines (example-real on the nixpkgs of 2020) at fleet scale.

    .venv/bin/python bench/evaluation.py [--machines 1 10 30] [--workers N] [--chunk N]
                                         [--fixture ../shared/fixtures/real-nix-2020.tar.xz]
                                         [--json bench/results/evaluation-<date>.json]

Unpacks the fixture to a temporary directory, locks a git copy of example-real against it, and
for each fleet size (example-real's generated machines: web, db, cache, monitor, builder)
measures, in the same run on the same machines:

- `nix eval` of each machine in turn (one process each, as deploy-rs or a loop of
  nixos-rebuild does): the floor of evaluation's CPU;
- flakefleet's evaluation (`flakefleet.evaluation`, its default workers and chunk), cold;
- flakefleet's evaluation again with nothing changed (a no-op redeploy: the cache).

For each: wall time, CPU (user + system of every process), and the controller's peak memory
(the resident memory of the measured process and all its children at once, sampled every
50 ms). Prints a Markdown table with the targets' verdicts and writes JSON. Builds nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import NIX  # noqa: E402
from flakefleet import evaluation  # noqa: E402

# As the tests find it: beside the checkout, or where FLAKEFLEET_FIXTURES says.
FIXTURES = Path(os.environ.get("FLAKEFLEET_FIXTURES") or ROOT.parent / "shared" / "fixtures")
FIXTURE = FIXTURES / "real-nix-2020.tar.xz"
ROLE_SETS = ["web", "db", "cache", "monitor", "builder", "db"]  # hosts.nix's, by number
PAGE = os.sysconf("SC_PAGE_SIZE")


def generated(count: int) -> list[str]:
    """The first `count` of example-real's generated machines (see its hosts.nix)."""
    return [f"{ROLE_SETS[(n - 1) % 6]}-{n:02d}" for n in range(1, count + 1)]


def tree_rss(root: int) -> int:
    """The resident memory of a process and all its descendants now, in bytes."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                parents[int(entry)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, added = {root}, True
    while added:
        more = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= more
        added = bool(more)
    total = 0
    for pid in tree:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            continue
    return total


def measure(argv: list[str]) -> dict[str, float]:
    """Run a command; its wall time, CPU seconds (its and its children's) and peak tree memory."""
    before = os.times()
    start = time.monotonic()
    process = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], tree_rss(process.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = process.communicate()
    done.set()
    sampler.join()
    seconds = time.monotonic() - start
    after = os.times()
    if process.returncode != 0:
        sys.exit(f"bench: {' '.join(argv[:6])}... failed:\n{err[-3000:]}")
    cpu = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    return {"wall": seconds, "cpu": cpu, "peak_mib": peak[0] / 2**20, "output": out, "log": err}


def one_by_one(flake: Path, machines: list[str]) -> dict[str, float]:
    """`nix eval` of each machine's system in turn, one process each; peak is the largest."""
    total = {"wall": 0.0, "cpu": 0.0, "peak_mib": 0.0}
    for machine in machines:
        attribute = f'nixosConfigurations."{machine}".config.system.build.toplevel.drvPath'
        found = measure([*NIX, "eval", "--raw", f"git+file://{flake}#{attribute}"])
        total = {
            "wall": total["wall"] + found["wall"],
            "cpu": total["cpu"] + found["cpu"],
            "peak_mib": max(total["peak_mib"], found["peak_mib"]),
        }
    return total


# The controller's side, in a child process of its own so its memory is measured alone.
FLAKEFLEET = """
import json, sys
from pathlib import Path
from flakefleet import evaluation, nix
flake, cache, names, workers, chunk = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), \\
    int(sys.argv[4]), int(sys.argv[5])
attributes = {n: nix.configuration_attribute("nixos", n, "root") for n in names}
pool = evaluation.Workers(workers, chunk)
found = evaluation.Evaluation(nix.Flake(Path(flake)), {"substituters": ""}, attributes, pool,
                              Path(cache)).start()
found.wait()
assert not found.errors, found.errors
print(json.dumps({"evaluated": pool.evaluated,
                  "systems": {n: s.drv for n, s in found.systems.items()}}))
"""


def flakefleet(flake: Path, cache: Path, machines: list[str], workers: int, chunk: int) -> dict:
    argv = [sys.executable, "-c", FLAKEFLEET, str(flake), str(cache), json.dumps(machines)]
    found = measure([*argv, str(workers), str(chunk)])
    return {**found, **json.loads(found.pop("output"))}


def prepare(fixture: Path, work: Path) -> Path:
    """The fixture's trees unpacked, and a git copy of example-real locked against them."""
    with tarfile.open(fixture) as archive:
        archive.extractall(work, filter="data")
    trees = work / "real-nix-2020"
    flake = work / "example-real"
    shutil.copytree(ROOT / "example-real", flake)
    overrides = {"nixpkgs": "nixpkgs", "home-manager": "home-manager", "darwin": "nix-darwin"}
    flags = [
        flag
        for name, tree in overrides.items()
        for flag in ("--override-input", name, f"path:{trees / tree}")
    ]
    subprocess.run([*NIX, "flake", "lock", f"path:{flake}", *flags], check=True)
    git = ["git", "-C", str(flake), "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "fleet"]):
        subprocess.run([*git, *command], check=True)
    return flake


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fixture", type=Path, default=FIXTURE)
    parser.add_argument("--machines", type=int, nargs="+", default=[1, 10, 30])
    parser.add_argument("--chunk", type=int, default=1)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument(
        "--json",
        type=Path,
        default=ROOT / "bench" / "results" / f"evaluation-{time.strftime('%Y%m%d-%H%M%S')}.json",
    )
    arguments = parser.parse_args()
    if not arguments.fixture.exists():
        sys.exit(f"bench: needs {arguments.fixture} (real nixpkgs of 2020; see its README)")
    workers = arguments.workers or evaluation.default_workers(arguments.chunk)
    rows = []
    with tempfile.TemporaryDirectory(prefix="flakefleet-bench-") as directory:
        work = Path(directory)
        flake = prepare(arguments.fixture, work)
        for count in arguments.machines:
            machines = generated(count)
            cache = work / f"cache-{count}"
            floor = one_by_one(flake, machines)
            cold = flakefleet(flake, cache, machines, workers, arguments.chunk)
            noop = flakefleet(flake, cache, machines, workers, arguments.chunk)
            assert sorted(cold["evaluated"]) == sorted(machines), cold["evaluated"]
            assert noop["evaluated"] == [] and noop["systems"] == cold["systems"]
            said = re.search(r"evaluated 0 of \d+ machines .* in ([\d.]+) s", noop["log"])
            noop["evaluation_seconds"] = float(said.group(1)) if said else None
            rows.append({"machines": count, "one_by_one": floor, "cold": cold, "noop": noop})
            print(f"bench: {count} machines done", file=sys.stderr)
    report(rows, workers, arguments.chunk)
    for row in rows:
        for measured in ("cold", "noop"):
            row[measured] = {k: v for k, v in row[measured].items() if k not in ("log", "systems")}
    arguments.json.parent.mkdir(parents=True, exist_ok=True)
    arguments.json.write_text(json.dumps({"workers": workers, "rows": rows}, indent=1))
    print(f"\n(written to {arguments.json})")


def report(rows: list[dict], workers: int, chunk: int) -> None:
    machine = f"{platform.node()}, {os.cpu_count()} cores, Nix {nix_version()}"
    print(f"\nEvaluation of example-real's machines, {date.today()}, {machine}; ", end="")
    print(f"flakefleet with {workers} workers, {chunk} machine(s) a chunk.\n")
    print(
        "| machines | one by one: wall / CPU / peak | flakefleet cold: wall / CPU / peak "
        "| cold wall / (one by one / workers used) | no-op: evaluation / whole process |"
    )
    print("|---:|---|---|---:|---|")
    for row in rows:
        floor, cold, noop = row["one_by_one"], row["cold"], row["noop"]
        bound = floor["wall"] / min(workers, row["machines"])
        print(
            f"| {row['machines']} | {floor['wall']:.1f} s / {floor['cpu']:.1f} s / "
            f"{floor['peak_mib']:.0f} MiB | {cold['wall']:.1f} s / {cold['cpu']:.1f} s / "
            f"{cold['peak_mib']:.0f} MiB | {cold['wall'] / bound:.2f} | "
            f"{noop['evaluation_seconds']} s / {noop['wall']:.2f} s |"
        )
    last = rows[-1]
    cold, noop, floor = last["cold"], last["noop"], last["one_by_one"]
    print(f"\nTargets at {last['machines']} machines:")
    print(f"- peak controller memory {cold['peak_mib'] / 1024:.2f} GiB (goal ≤ 2.5 GiB)")
    print(
        f"- wall {cold['wall']:.1f} s vs one by one / workers + 20 % = "
        f"{floor['wall'] / workers * 1.2:.1f} s"
    )
    print(
        f"- no-op redeploy's evaluation {noop['evaluation_seconds']} s "
        f"({noop['wall']:.2f} s with Python's start) (goal < 1 s)"
    )


def nix_version() -> str:
    return subprocess.run(["nix", "--version"], capture_output=True, text=True).stdout.split()[-1]


if __name__ == "__main__":
    main()
