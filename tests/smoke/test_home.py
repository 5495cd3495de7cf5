"""home-manager machines: the user's profile selects the deployed generation, and its files
are linked into the user's home."""

import pytest

from flakefleet.target import Target

classes = {"home"}


@pytest.fixture(scope="module")
def generation(host):
    user = host.check_output("id -un")
    return host.check_output(f"readlink -f /nix/var/nix/profiles/per-user/{user}/home-manager")


def test_profile_selects_the_expected_generation(generation, expected_system):
    if expected_system is None:
        pytest.skip("no --expect-system for this machine")
    assert generation == expected_system


def test_generation_is_valid_in_the_store(host, machine, generation):
    nix_store = Target.from_data(machine["name"], machine).nix("nix-store")
    assert host.run(f"{nix_store} --verify-path {generation}").rc == 0


def test_home_files_are_linked(host, generation):
    files = host.check_output(f"cd {generation}/home-files && find . -type f").split()
    assert files
    for name in files:
        link = host.file(f"$HOME/{name.removeprefix('./')}")
        assert host.check_output(f"readlink $HOME/{name.removeprefix('./')}") == (
            f"{generation}/home-files/{name.removeprefix('./')}"
        ), link
