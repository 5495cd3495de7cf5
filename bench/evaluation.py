"""Benchmark: evaluating example-real's machines (real nixpkgs, home-manager, nix-darwin of 2020).

    .venv/bin/python bench/evaluation.py [--fixture ../shared/fixtures/real-nix-2020.tar.xz]

Unpacks the fixture to a temporary directory, locks a copy of example-real against it, then
evaluates each machine's system derivation alone (`nix eval`, one process each, as a plan of one
machine does) and all of one class together (one `nix eval --apply`, as a deploy does), and
prints the wall time and peak memory (maximum resident set size) of each. Builds nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from flakefleet import nix

ROOT = Path(__file__).resolve().parents[1]
NIX = ["nix", *nix.FEATURES, "--option", "substituters", ""]
MACHINES = {
    "web1": ("nixos", "web1", "root"),
    "db1": ("nixos", "db1", "root"),
    "build1": ("nixos", "build1", "root"),
    "devmac": ("darwin", "devmac", "root"),
    "home1": ("home", "home1", "deploy"),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    default = ROOT.parent / "shared" / "fixtures" / "real-nix-2020.tar.xz"
    parser.add_argument("--fixture", type=Path, default=default)
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="flakefleet-bench-") as directory:
        work = Path(directory)
        with tarfile.open(arguments.fixture) as archive:
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
        # Each measurement in a fresh Python child, so each peak is that command's own.
        print(f"{'machine':<16} {'seconds':>8} {'peak MiB':>9}  derivation")
        rows = []
        for machine, (kind, name, user) in MACHINES.items():
            attribute = nix.describe_attribute(nix.configuration_attribute(kind, name, user)[:1])
            attribute = attribute.replace(f"{user}@{name}", f'"{user}@{name}"')
            rows.append((machine, [*NIX, "eval", "--raw", f"path:{flake}#{attribute}.drvPath"]))
        nixos = {
            m: nix.configuration_attribute("nixos", m, "root") for m in ("web1", "db1", "build1")
        }
        # As flakefleet evaluates a batch (flakefleet.nix._evaluate): one process per output.
        selection = nix.selection_expression('{ "nixosConfigurations" = output; }', nixos)
        batch = [
            *NIX, "eval", "--json", f"path:{flake}#nixosConfigurations", "--apply",
            f"output: builtins.mapAttrs (name: system: system.drvPath) ({selection})",
        ]  # fmt: skip
        rows.append(("web1+db1+build1", batch))
        for label, argv in rows:
            script = (
                "import json, resource, subprocess, sys, time\n"
                "start = time.monotonic()\n"
                "out = subprocess.run(json.loads(sys.argv[1]), capture_output=True, text=True,"
                " check=True).stdout\n"
                "print(json.dumps([time.monotonic() - start,"
                " resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, out]))\n"
            )
            shown = subprocess.run(
                ["python3", "-c", script, json.dumps(argv)],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            seconds, peak, output = json.loads(shown)
            print(f"{label:<16} {seconds:>8.1f} {peak:>9.0f}  {output.strip()[:90]}")


if __name__ == "__main__":
    main()
