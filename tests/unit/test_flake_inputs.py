"""A flake's inputs, with real Nix on the controller: the lock file is used as it is (never
written, never updated), a missing or changed input is one line naming it and the command that
locks it, inputs come from the store once locked, and `--override-input` passes through."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from flakefleet import nix
from flakefleet.evaluation import evaluate_systems
from flakefleet.settings import MachineSettings

NIX = ["nix", *nix.FEATURES, "--option", "substituters", ""]
MACHINE = {"m": nix.configuration_attribute("nixos", "m", "root")}


def make_flake(tmp_path: Path, input_url: str) -> Path:
    """A flake whose one machine's system embeds a file of a `flake = false` input."""
    flake = tmp_path / "fleet"
    flake.mkdir(exist_ok=True)
    (flake / "flake.nix").write_text(
        "{\n"
        f'  inputs.lib = {{ url = "{input_url}"; flake = false; }};\n'
        "  outputs = { self, lib }: {\n"
        "    nixosConfigurations.m.config.system.build.toplevel = derivation {\n"
        '      name = "system-" + builtins.replaceStrings [ "\\n" ] [ "" ]'
        ' (builtins.readFile "${lib}/version");\n'
        '      system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "echo > $out" ];\n'
        "    };\n"
        "  };\n"
        "}\n"
    )
    return flake


def library(tmp_path: Path, name: str, version: str) -> Path:
    directory = tmp_path / name
    directory.mkdir()
    (directory / "version").write_text(version + "\n")
    return directory


def lock(flake: Path) -> None:
    subprocess.run([*NIX, "flake", "lock", f"path:{flake}"], check=True, capture_output=True)


def test_an_input_missing_from_the_lock_file_is_named_with_the_command_that_locks_it(tmp_path):
    lib = library(tmp_path, "lib", "1")
    flake = make_flake(tmp_path, f"path:{lib}")
    problem = nix.lock_problem(nix.Flake(flake), {})
    assert problem is not None and "\n" not in problem
    assert "input 'lib'" in problem
    assert f"nix flake lock {flake}" in problem
    assert not (flake / "flake.lock").exists()


def test_an_evaluation_never_writes_nor_updates_the_lock_file(tmp_path):
    lib = library(tmp_path, "lib", "1")
    flake = make_flake(tmp_path, f"path:{lib}")
    with pytest.raises(nix.NixError, match="lock file changes"):
        evaluate_systems(flake, MACHINE, {})
    assert not (flake / "flake.lock").exists()  # Nix alone would have written one

    lock(flake)
    locked = (flake / "flake.lock").read_text()
    other = library(tmp_path, "other", "2")
    (flake / "flake.nix").write_text(
        (flake / "flake.nix").read_text().replace(str(lib), str(other))
    )
    with pytest.raises(nix.NixError, match="lock file changes"):
        evaluate_systems(flake, MACHINE, {})
    assert (flake / "flake.lock").read_text() == locked
    problem = nix.lock_problem(nix.Flake(flake), {})
    assert problem is not None and "input 'lib'" in problem and "nix flake lock" in problem


def test_a_locked_input_comes_from_the_store_once_fetched(tmp_path):
    """The input's source is gone (as a forge out of reach would be): evaluating needs only
    the lock file and the store."""
    lib = library(tmp_path, "lib", "1")
    flake = make_flake(tmp_path, f"path:{lib}")
    lock(flake)
    first = evaluate_systems(flake, MACHINE, {})["m"]
    shutil.rmtree(lib)
    assert nix.lock_problem(nix.Flake(flake), {}) is None
    assert evaluate_systems(flake, MACHINE, {})["m"] == first
    assert first.out.endswith("-system-1")


def test_an_override_evaluates_a_local_checkout_and_leaves_the_lock_file(tmp_path):
    lib = library(tmp_path, "lib", "1")
    flake = make_flake(tmp_path, f"path:{lib}")
    lock(flake)
    locked = (flake / "flake.lock").read_text()
    checkout = library(tmp_path, "checkout", "2")
    overridden = nix.Flake(flake, (("lib", str(checkout)),))
    assert "--override-input" in overridden.lock_flags()
    assert nix.lock_problem(overridden, {}) is None
    system = evaluate_systems(overridden, MACHINE, {})["m"]
    assert system.out.endswith("-system-2")
    assert (flake / "flake.lock").read_text() == locked


def test_an_untracked_lock_file_of_a_git_flake_is_said_so(tmp_path):
    """Nix reads a git flake's tracked files only: a flake.lock git does not track is none."""
    lib = library(tmp_path, "lib", "1")
    flake = make_flake(tmp_path, f"path:{lib}")
    lock(flake)
    subprocess.run(["git", "init", "-q", str(flake)], check=True)
    subprocess.run(["git", "-C", str(flake), "add", "flake.nix"], check=True)
    problem = nix.lock_problem(nix.Flake(flake), {})
    assert problem is not None
    assert "not tracked by git" in problem and "git add flake.lock" in problem


def test_override_paths_are_the_repository_s_and_refs_pass_as_they_are(tmp_path):
    settings = MachineSettings.from_data(
        {"override_inputs": {"lib": "../lib", "nixpkgs": "github:NixOS/nixpkgs/abc"}},
        [],
        tmp_path / "repo",
    )
    assert settings.override_inputs == (
        ("lib", str(tmp_path / "lib")),
        ("nixpkgs", "github:NixOS/nixpkgs/abc"),
    )
    assert settings.flake_source(tmp_path / "repo").override_flags() == [
        "--override-input", "lib", str(tmp_path / "lib"),
        "--override-input", "nixpkgs", "github:NixOS/nixpkgs/abc",
    ]  # fmt: skip


def test_a_setting_read_from_a_command_is_in_nix_s_environment_never_its_arguments(tmp_path):
    secret = "github.com=ghp_never_in_argv"
    settings = MachineSettings.from_data(
        {"nix_options": {"cores": 2, "access-tokens": {"command": f"echo {secret}"}}},
        [],
        tmp_path,
    )
    flags = nix.option_flags(settings.nix_options)
    assert flags == ["--option", "cores", "2"]
    environment = nix.option_environment(settings.nix_options)
    assert f"access-tokens = {secret}" in environment["NIX_CONFIG"].splitlines()
    shown = subprocess.run(
        ["nix", *nix.FEATURES, *flags, "show-config", "--json"],
        env={**os.environ, **environment},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert json.loads(shown.stdout)["access-tokens"]["value"] == {"github.com": "ghp_never_in_argv"}


def test_a_failing_command_is_said_without_its_output(tmp_path):
    settings = MachineSettings.from_data(
        {"nix_options": {"access-tokens": {"command": "echo part$(echo ial)-secret; exit 3"}}},
        [],
        tmp_path,
    )
    with pytest.raises(nix.NixError) as raised:
        nix.option_environment(settings.nix_options)
    assert "exited 3" in str(raised.value) and "partial-secret" not in str(raised.value)


def instantiate(tmp_path: Path, expression: str) -> str:
    (tmp_path / "default.nix").write_text(expression)
    return subprocess.run(
        ["nix-instantiate", str(tmp_path / "default.nix")],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip


def test_a_build_that_would_download_is_told_apart_without_building(tmp_path):
    """What the plan asks before building for a package list: the real nixpkgs' first
    derivations are fetches (fixed-output), which an offline controller retries for minutes."""
    plain = 'derivation { name = "plain"; system = "x86_64-linux"; builder = "/bin/sh"; '
    fetch = (
        'let source = derivation { name = "source.tar.gz"; system = "builtin"; '
        'builder = "builtin:fetchurl"; url = "http://tarballs.invalid/source.tar.gz"; '
        'outputHashAlgo = "sha256"; outputHashMode = "flat"; '
        'outputHash = "0000000000000000000000000000000000000000000000000000"; }; in '
    )
    alone = instantiate(tmp_path, plain + 'args = [ "-c" "echo > $out" ]; }')
    assert nix.downloads(alone, {"substituters": ""}) == []
    fetching = instantiate(
        tmp_path, fetch + plain + 'inherit source; args = [ "-c" "echo > $out" ]; }'
    )
    assert nix.downloads(fetching, {"substituters": ""}) == ["source.tar.gz"]
