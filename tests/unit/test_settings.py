"""Machine settings: what passes, and the one-line problems for what does not."""

import runpy
from pathlib import Path

import pytest

from flakefleet.settings import origin, problems

ROOT = Path(__file__).resolve().parents[2]
FLEET = ["web1", "build1"]


def public(path: Path) -> dict:
    """A group_data file's settings, as pyinfra reads them (its public names)."""
    names = runpy.run_path(str(path))
    return {name: value for name, value in names.items() if not name.startswith("_")}


def check(data: dict, label: str = "--data") -> list[str]:
    return problems(data, [(label, data)], FLEET, ROOT)


@pytest.mark.parametrize("group", sorted((ROOT / "group_data").glob("*.py")), ids=lambda p: p.name)
def test_the_shipped_group_data_passes(group):
    assert check(public(group), f"group_data/{group.name}") == []


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (
            {"on_check_failure": "rolback"},
            "setting 'on_check_failure' (--data): must be one of rollback, keep, stop, "
            "not 'rolback'",
        ),
        (
            {"keep_generations": 0},
            "setting 'keep_generations' (--data): must be a whole number of at least 1 "
            "(or None), not 0",
        ),
        (
            {"confirm_timeout": "30"},
            "setting 'confirm_timeout' (--data): must be a number of at least 0, not '30'",
        ),
        (
            {"copy_compress": "yes"},
            "setting 'copy_compress' (--data): must be True or False, not 'yes'",
        ),
        (
            {"remote_nix_dir": "nix/bin"},
            "setting 'remote_nix_dir' (--data): must be an absolute path, not 'nix/bin'",
        ),
        (
            {"checks": [{"command": "true", "http": "http://x"}]},
            "setting 'checks' (--data): check 1 needs either 'command' or 'http', "
            "not [{'command': 'true', 'http': 'http://x'}]",
        ),
        (
            {"build_on": "build2"},
            "setting 'build_on' (--data): 'build2' is not local, target, a fleet machine or an "
            "ssh:// or ssh-ng:// URL",
        ),
        (
            {"cache": {"machine": "build2"}},
            "setting 'cache' (--data): machine 'build2' is not in the fleet",
        ),
        (
            {"nix_options": {"access-tokens": {"cmd": "pass show token"}}},
            "setting 'nix_options' (--data): must be a mapping of Nix settings to values or "
            "{'command': ...}, e.g. {'cores': '2', 'access-tokens': {'command': 'pass show "
            "forge-token'}}, not {'access-tokens': {'cmd': 'pass show token'}}",
        ),
        (
            {"override_inputs": {"mylib": ""}},
            "setting 'override_inputs' (--data): must be a mapping of input names to flake "
            "references, e.g. {'mylib': '../mylib'}, not {'mylib': ''}",
        ),
        (
            {"flake_attribute": "dev mac"},
            "setting 'flake_attribute' (--data): must be a name of letters, digits, '.', '_' "
            "or '-', not 'dev mac'",
        ),
        (
            {"meta": ["alice"]},
            "setting 'meta' (--data): must be a mapping, e.g. {'stateVersion': '25.11', "
            "'users': ['alice']}, not ['alice']",
        ),
        (
            {"reboot_timout": 5},
            "setting 'reboot_timout' (--data): unknown; did you mean 'reboot_timeout'?",
        ),
    ],
)
def test_a_bad_setting_is_one_line_naming_it_and_its_layer(data, problem):
    assert check(data) == [problem]


def test_good_values_and_names_far_from_any_setting_pass():
    assert check({"build_on": "build1", "keep_generations": None, "confirm_timeout": 2.5}) == []
    assert check({"cache": {"store": "file://cache", "url": "http://127.0.0.1:8370"}}) == []
    assert check({"checks": [{"http": "http://web1/health", "status": 204, "timeout": 5}]}) == []
    assert check({"site_title": "Fleet", "ssh_user": "deploy", "_env": {}}) == []
    assert check({"nix_options": {"cores": 2, "access-tokens": {"command": "pass x"}}}) == []
    assert check({"flake_attribute": "devmac", "meta": {"users": ["alice"]}}) == []
    assert check({"override_inputs": {"nixpkgs": "github:NixOS/nixpkgs/abc"}}) == []


def test_the_highest_layer_that_sets_a_value_is_named():
    found = [
        ("group_data/all.py", {"reboot": "never"}),
        ("group_data/web.py", {"reboot": "sometimes"}),
        ("fleet.yaml, machine 'web1'", {}),
    ]
    assert origin(found, "reboot") == "group_data/web.py"
    assert problems({"reboot": "sometimes"}, found, FLEET, ROOT) == [
        "setting 'reboot' (group_data/web.py): must be one of never, when-needed, always, "
        "not 'sometimes'"
    ]
