"""Evaluation of real NixOS machines (example-real on the nixpkgs of 2020) and its cache: a
redeploy of the unchanged flake evaluates nothing, a change to one machine's module evaluates
that machine only, and what it gives is what `nix eval` gives. Two machines, to stay short
(bench/evaluation.py measures 1, 10 and 30)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from conftest import NIX, locked_real_flake, needs_real_nix

from flakefleet import nix
from flakefleet.evaluation import Evaluation, Workers

MACHINES = ("web1", "db1")


def evaluate(flake: Path, cache: Path) -> tuple[list[str], dict[str, nix.System]]:
    """Evaluate the machines as a run does; which ones Nix evaluated, and their systems."""
    attributes = {name: nix.configuration_attribute("nixos", name, "root") for name in MACHINES}
    workers = Workers(2)
    found = Evaluation(nix.Flake(flake), {"substituters": ""}, attributes, workers, cache)
    found.start().wait()
    assert found.errors == {}
    return sorted(workers.evaluated), found.systems


@needs_real_nix
def test_a_real_machine_is_evaluated_again_only_when_its_own_files_change(
    tmp_path_factory, tmp_path
):
    flake = tmp_path / "example-real"
    shutil.copytree(locked_real_flake(tmp_path_factory), flake)
    git = ["git", "-C", str(flake), "-c", "user.name=t", "-c", "user.email=t@t"]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "fleet"]):
        subprocess.run([*git, *command], check=True, capture_output=True)
    cache = tmp_path / "cache"
    assert evaluate(flake, cache)[0] == ["db1", "web1"]
    evaluated, before = evaluate(flake, cache)
    assert evaluated == []

    module = flake / "hosts" / "web1" / "default.nix"
    module.write_text(module.read_text().replace('"/dev/sda"', '"/dev/sdb"'))
    evaluated, after = evaluate(flake, cache)
    assert evaluated == ["web1"]
    assert after["db1"] == before["db1"] and after["web1"] != before["web1"]
    attribute = "nixosConfigurations.web1.config.system.build.toplevel.drvPath"
    direct = subprocess.run(
        [*NIX, "eval", "--raw", f"git+file://{flake}#{attribute}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert after["web1"].drv == direct
