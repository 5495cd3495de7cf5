"""The controller's Nix commands: flags, errors, attributes, and a real evaluation."""

import json
import subprocess
from pathlib import Path

import pytest

from flakefleet import nix


@pytest.mark.parametrize(
    ("settings", "flags"),
    [
        ({}, []),
        ({"check_sigs": False}, ["--no-check-sigs"]),
        # Before Nix 2.20, ssh-ng substitutes on the destination only with an option.
        ({"substitute": True, "protocol": "ssh-ng"}, ["--substitute-on-destination"]),
        ({"substitute": True}, ["--substitute-on-destination"]),
    ],
)
def test_copy_flags_are_ones_this_nix_takes(tmp_path, settings, flags):
    """A real copy with them, to a local binary cache (the flags are what the copies to
    machines pass; the integration tests copy to machines with the default ones)."""
    (tmp_path / "file").write_text(str(settings))
    path = subprocess.run(
        ["nix-store", "--add", str(tmp_path / "file")], capture_output=True, text=True, check=True
    ).stdout.strip()
    given = nix.copy_flags(**settings)
    assert all(flag in given for flag in flags)
    subprocess.run(
        ["nix", *nix.FEATURES, "copy", "--to", f"file://{tmp_path}/cache", *given, path],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert (tmp_path / "cache" / f"{Path(path).name.split('-')[0]}.narinfo").exists()


def test_copy_errors_say_when_a_signature_was_refused():
    for output in (
        "error: cannot add path '/nix/store/x' because it lacks a valid signature\n",  # Nix 2.8
        # Nix 2.26 (Debian trixie's, a systemd test machine's) says it its own way.
        "error: cannot add path '/nix/store/x' because it lacks a signature by a trusted key\n",
    ):
        assert nix.copy_error(output).startswith(
            "the destination does not trust the closure's signatures"
        ), output
    assert nix.copy_error("error: writing to file: No space left on device") == (
        "error: writing to file: No space left on device"
    )
    assert nix.copied_count("copying 12 paths...\n") == 12


def test_classes_attributes():
    assert nix.configuration_attribute("home", "home1", "deploy") == [
        ["homeConfigurations", "deploy@home1", "activationPackage"],
        ["homeConfigurations", "deploy", "activationPackage"],
    ]
    assert nix.configuration_attribute("darwin", "mac1", "deploy") == [
        ["darwinConfigurations", "mac1", "system"]
    ]


def test_home_configurations_fall_back_to_the_user_name(tmp_path):
    (tmp_path / "flake.nix").write_text(
        "{ outputs = { self }: { homeConfigurations = {"
        ' "alice".activationPackage = { drvPath = "a.drv"; outPath = "alice"; };'
        ' "bob@deck".activationPackage = { drvPath = "b.drv"; outPath = "bob-deck"; };'
        ' "bob".activationPackage = { drvPath = "c.drv"; outPath = "bob"; }; }; }; }'
    )
    attributes = {
        "deck1": nix.configuration_attribute("home", "deck1", "alice"),
        "deck": nix.configuration_attribute("home", "deck", "bob"),
    }
    expression = nix.systems_expression(json.dumps(f"path:{tmp_path}"), attributes)
    completed = subprocess.run(
        ["nix", *nix.FEATURES, "eval", "--impure", "--json", "--expr",
         f"builtins.mapAttrs (n: s: s.outPath) ({expression})"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert json.loads(completed.stdout) == {"deck1": "alice", "deck": "bob-deck"}
