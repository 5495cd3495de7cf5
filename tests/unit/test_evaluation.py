"""Evaluation in chunks by parallel workers, and its cache, with real Nix on a small git flake
(one module per machine, a shared one, a `flake = false` input): what is evaluated again after
each kind of change, counted by the run's workers, and every reused system checked against a
fresh evaluation without the cache."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from flakefleet import evaluation, nix
from flakefleet.evaluation import Evaluation, Workers, evaluate_systems

NIX = ["nix", *nix.FEATURES, "--option", "substituters", ""]
OPTIONS = {"substituters": ""}
MACHINES = ("m1", "m2", "m3")
FLAKE = """{
  inputs.lib = { url = "path:LIB"; flake = false; };
  outputs = { self, lib }:
    let
      common = import ./common.nix;
      system = name: derivation {
        name = "system-${name}";
        system = "x86_64-linux";
        builder = "/bin/sh";
        args = [ "-c" "echo > $out" ];
        settings = (import (./machines + "/${name}.nix")) { inherit self; };
        inherit common;
        version = builtins.readFile "${lib}/version";
      };
    in {
      nixosConfigurations = builtins.listToAttrs (map
        (name: { inherit name; value.config.system.build.toplevel = system name; })
        [ "m1" "m2" "m3" ]);
    };
}
"""


def git(flake: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-C", str(flake), "-c", "user.name=t", "-c", "user.email=t@t", *args],
        check=True, capture_output=True,
    )  # fmt: skip


@pytest.fixture
def flake(tmp_path: Path) -> Path:
    library = tmp_path / "lib"
    library.mkdir()
    (library / "version").write_text("1")
    flake = tmp_path / "fleet"
    (flake / "machines").mkdir(parents=True)
    (flake / "flake.nix").write_text(FLAKE.replace("LIB", str(library)))
    (flake / "common.nix").write_text('"common"\n')
    for name in MACHINES:
        (flake / "machines" / f"{name}.nix").write_text(f'{{ self }}: "{name} settings"\n')
    subprocess.run([*NIX, "flake", "lock", f"path:{flake}"], check=True, capture_output=True)
    git(flake, "init", "-q")
    git(flake, "add", "-A")
    git(flake, "commit", "-q", "-m", "fleet")
    return flake


def attributes(*names: str) -> dict[str, nix.Attributes]:
    return {name: nix.configuration_attribute("nixos", name, "root") for name in names}


def deploy(flake: Path, cache: Path, chunk: int = 1) -> tuple[list[str], dict[str, nix.System]]:
    """Evaluate the machines as a run does: which Nix evaluated, and every system, each checked
    against an evaluation without the cache."""
    workers = Workers(2, chunk)
    found = Evaluation(nix.Flake(flake), OPTIONS, attributes(*MACHINES), workers, cache).start()
    found.wait()
    assert found.errors == {}
    assert found.systems == evaluate_systems(flake, attributes(*MACHINES), OPTIONS)
    return sorted(workers.evaluated), found.systems


def test_only_what_changed_is_evaluated_again(flake, tmp_path):
    cache = tmp_path / "cache"
    assert deploy(flake, cache)[0] == ["m1", "m2", "m3"]
    evaluated, before = deploy(flake, cache)
    assert evaluated == []  # nothing changed: no evaluation at all

    # An uncommitted change to one machine's module: that machine only.
    (flake / "machines" / "m2.nix").write_text('{ self }: "m2 changed"\n')
    evaluated, after = deploy(flake, cache)
    assert evaluated == ["m2"] and after["m2"] != before["m2"]
    assert after["m1"] == before["m1"]
    # Committed as it is: nothing the machines read changed (none reads the revision).
    git(flake, "commit", "-qam", "m2")
    assert deploy(flake, cache)[0] == []

    # A module every machine reads, then a file no machine reads.
    (flake / "common.nix").write_text('"common changed"\n')
    assert deploy(flake, cache)[0] == ["m1", "m2", "m3"]
    (flake / "README").write_text("not read\n")
    git(flake, "add", "README")
    assert deploy(flake, cache)[0] == []

    # A new module where a machine looked (and found nothing before) is a change for it.
    (flake / "machines" / "m2.nix").write_text("{ self }: import ./m2-extra.nix\n")
    (flake / "machines" / "m2-extra.nix").write_text('"extra"\n')
    git(flake, "add", "-A")
    assert deploy(flake, cache)[0] == ["m2"]
    (flake / "machines" / "m2-extra.nix").write_text('"extra, changed"\n')
    assert deploy(flake, cache)[0] == ["m2"]


def test_a_flake_in_a_subdirectory_is_cached_by_its_repositorys_tracked_files(flake, tmp_path):
    """As the repository's example/ is: Nix takes the work tree's tracked files, so untracked
    ones beside the flake (a test fleet's sockets, a virtualenv) are neither read nor a change."""
    repository = tmp_path / "repository"
    repository.mkdir()
    shutil.rmtree(flake / ".git")
    flake = flake.rename(repository / "fleet")
    git(repository, "init", "-q")
    git(repository, "add", "-A")
    git(repository, "commit", "-q", "-m", "fleet")
    with socket.socket(socket.AF_UNIX) as listening:  # what ssh's ControlPath leaves
        listening.bind(str(repository / "control.sock"))
        cache = tmp_path / "cache"
        assert deploy(flake, cache)[0] == ["m1", "m2", "m3"]
        (repository / "untracked.txt").write_text("not Nix's\n")
        assert deploy(flake, cache)[0] == []
        (flake / "machines" / "m3.nix").write_text('{ self }: "m3 changed"\n')
        assert deploy(flake, cache)[0] == ["m3"]


def test_a_changed_lock_file_evaluates_every_machine(flake, tmp_path):
    cache = tmp_path / "cache"
    _, before = deploy(flake, cache)
    (tmp_path / "lib" / "version").write_text("2")
    lock = [*NIX, "flake", "lock", f"git+file://{flake}", "--update-input", "lib"]
    subprocess.run(lock, check=True, capture_output=True)
    evaluated, after = deploy(flake, cache)
    assert evaluated == ["m1", "m2", "m3"]
    assert all(after[name] != before[name] for name in MACHINES)


def test_a_machine_that_reads_the_revision_or_the_whole_flake_follows_every_change(flake, tmp_path):
    """m1 embeds the flake's own source (`${self}`), m3 its revision: any commit changes them."""
    (flake / "machines" / "m1.nix").write_text('{ self }: "${self}"\n')
    (flake / "machines" / "m3.nix").write_text('{ self }: self.rev or "dirty"\n')
    git(flake, "commit", "-qam", "whole")
    cache = tmp_path / "cache"
    deploy(flake, cache)
    (flake / "README").write_text("read by nobody\n")
    git(flake, "add", "README")
    git(flake, "commit", "-qm", "readme")
    evaluated, _ = deploy(flake, cache)
    assert evaluated == ["m1", "m3"]


def test_an_evaluation_error_fails_only_its_machine(flake, tmp_path):
    (flake / "machines" / "m2.nix").write_text('{ self }: throw "m2 is broken"\n')
    workers = Workers(1, chunk=3)  # all three in one `nix eval`
    found = Evaluation(nix.Flake(flake), OPTIONS, attributes(*MACHINES), workers).start()
    found.wait()
    assert set(found.systems) == {"m1", "m3"}
    assert found.errors["m2"].startswith(
        "evaluation of nixosConfigurations.m2.config.system.build.toplevel failed: error:"
    )
    assert "m2 is broken" in found.errors["m2"] and "\n" not in found.errors["m2"]
    with pytest.raises(nix.NixError, match="m2 is broken"):
        found.result("m2")
    assert found.systems == evaluate_systems(flake, attributes("m1", "m3"), OPTIONS)


def test_chunks_and_workers_give_the_same_systems(flake):
    systems = []
    for count, chunk in ((1, 3), (2, 1), (3, 2)):
        workers = Workers(count, chunk)
        found = Evaluation(nix.Flake(flake), OPTIONS, attributes(*MACHINES), workers).start()
        found.wait()
        systems.append(found.systems)
    assert systems[0] == systems[1] == systems[2] and len(systems[0]) == 3


def test_workers_default_to_cores_and_memory():
    assert 1 <= evaluation.default_workers() <= (evaluation.os.cpu_count() or 1)
    assert evaluation.default_workers(chunk=10**6) == 1  # a chunk no memory holds twice
