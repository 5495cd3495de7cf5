"""Every machine: it runs the system the deploy meant it to, and that system is whole."""

import pytest

from flakefleet.target import Target

classes = {"nixos", "darwin"}


def test_runs_the_expected_system(host, expected_system):
    if expected_system is None:
        pytest.skip("no --expect-system for this machine")
    assert host.check_output("readlink -f /run/current-system") == expected_system


def test_system_is_valid_in_the_store(host, machine):
    nix_store = Target.from_data(machine["name"], machine).nix("nix-store")  # off PATH on macOS
    assert host.run(f"{nix_store} --verify-path $(readlink -f /run/current-system)").rc == 0


def test_release_names_this_machine(host, machine):
    assert host.file("/etc/fleet-release").content_string.split()[0] == machine["name"]


def test_sources_are_in_place(host):
    assert host.file("/var/src/config/flake.nix").is_file
