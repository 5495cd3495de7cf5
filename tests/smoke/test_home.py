"""home-manager machines: the user's profile selects the deployed generation, and its files
are linked into the user's home."""

import pytest

from flakefleet.target import Target

classes = {"home"}


# Where home-manager's own tool finds the profile (home-manager/home-manager,
# setHomeManagerPathVariables): after `nix-env -q`, ~/.local/state/nix/profiles if it exists
# (Nix 2.14 and later), else the per-user directory of older Nix.
PROFILES = (
    "nix-env -q >/dev/null 2>&1 || true; "
    'd="${XDG_STATE_HOME:-$HOME/.local/state}/nix/profiles"; '
    '[ -d "$d" ] || d=/nix/var/nix/profiles/per-user/$(id -un)'
)


@pytest.fixture(scope="module")
def generation(host, machine):
    nix = Target.from_data(machine["name"], machine).nix("nix-env").removesuffix("nix-env")
    path = f'PATH="{nix}:$PATH"; ' if nix else ""
    return host.check_output(f'{path}{PROFILES}; readlink -f "$d/home-manager"')


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
