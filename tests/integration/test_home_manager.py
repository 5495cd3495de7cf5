"""home-manager machines on Nix before 2.14 (the namespace machine's Debian Nix 2.8) and after
(a systemd machine's Nix 2.26), each test once on each, for a fresh user and for one whose
profile is still where Nix before 2.14 kept it.

What flakefleet is held to, from home-manager's own tool (home-manager/home-manager) and
activation (modules/home-environment.nix, modules/lib-bash/activation-init.sh):
- the profile is `home-manager` in the directory `setHomeManagerPathVariables` picks after
  `nix-env -q`: ~/.local/state/nix/profiles when it exists (Nix 2.14 and later make it), else
  /nix/var/nix/profiles/per-user/<user> (Nix before 2.14: its daemon makes it);
- `doSwitch`: the profile is set, then `activate --driver-version 1` (the imitation logs the
  driver version it was called with; without it, it would set the profile itself);
- `doListGens`: `home-manager generations` lists that directory's `home-manager-*-link` links and
  marks the one `home-manager` names; `generations()` reads the same links.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, Fleet, evaluate, running_fleet, set_host

# Which kind of test machine runs which Nix (testbed: namespace machines run Debian's 2.8,
# systemd machines trixie's 2.26).
NIX = {"nix-2.8": "2.8", "nix-2.26": "trixie"}  # the roster's `nix` knob
USER = "deploy"
OLD_PROFILES = f"/nix/var/nix/profiles/per-user/{USER}"
NEW_PROFILES = f"/var/lib/{USER}/.local/state/nix/profiles"  # the test fleet's deploy's home
# setHomeManagerPathVariables, as home-manager/home-manager has it.
HM_PROFILE_DIR = (
    "nix-env -q >/dev/null 2>&1 || true; "
    'd="${XDG_STATE_HOME:-$HOME/.local/state}/nix/profiles"; '
    '[ -d "$d" ] || d=/nix/var/nix/profiles/per-user/$USER; '
)


@pytest.fixture(scope="module", params=list(NIX))
def fleet(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """home1 alone, on the Nix the parameter names."""
    hosts = json.loads((ROOT / "example" / "hosts.json").read_text())
    roster = tmp_path_factory.mktemp("roster") / "hosts.json"
    roster.write_text(json.dumps({"home1": {**hosts["home1"], "nix": NIX[request.param]}}))
    with running_fleet("--roster", str(roster)) as testbed:
        testbed.nix = request.param  # type: ignore[attr-defined]
        yield testbed


@pytest.fixture(scope="module")
def flake(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh copy of the example flake for each fleet."""
    copy = tmp_path_factory.mktemp("flake") / "example"
    shutil.copytree(ROOT / "example", copy)
    yield copy


def as_user(fleet: Fleet, script: str) -> str:
    return fleet.ssh(f"{USER}@home1", script)


def generations(fleet: Fleet) -> dict[str, str]:
    """What `home-manager generations` would list on home1 (doListGens): each generation link
    of the profile directory and the system it links to; `current`: what `home-manager`
    selects; `dir`: that directory."""
    script = HM_PROFILE_DIR + (
        'cd "$d" && for l in home-manager-*-link; do [ -L "$l" ] && echo "$l $(readlink -f "$l")"; '
        'done; echo "current $(readlink -f home-manager)"; echo "dir $d"'
    )
    return dict(line.split(" ", 1) for line in as_user(fleet, script).splitlines())


def last_activation(fleet: Fleet) -> str:
    return as_user(fleet, "tail -1 ~/.local/state/home-manager/activations.log")


def profiles_dir(fleet: Fleet) -> str:
    return NEW_PROFILES if fleet.nix == "nix-2.26" else OLD_PROFILES  # type: ignore[attr-defined]


def test_a_fresh_user_switches_where_home_manager_keeps_the_profile(fleet, flake):
    result = fleet.deploy(flake)
    assert result.status("home1") == "changed", result.output
    system = evaluate(flake, "home1")
    listed = generations(fleet)
    assert listed == {"home-manager-1-link": system, "current": system, "dir": profiles_dir(fleet)}
    assert last_activation(fleet).endswith(f"activated {system} (driver version 1)")
    assert as_user(fleet, "cat ~/.config/fleet/version") == "1"


def test_a_switch_then_a_rollback(fleet, flake):
    first = evaluate(flake, "home1")
    set_host(flake, "home1", version="2")
    second = evaluate(flake, "home1")
    assert fleet.deploy(flake).status("home1") == "changed"
    listed = generations(fleet)
    assert (listed["home-manager-2-link"], listed["current"]) == (second, second)
    assert as_user(fleet, "cat ~/.config/fleet/version") == "2"

    result = fleet.deploy(flake, deploy_file="deploy/rollback.py")
    assert result.status("home1") == "changed", result.output
    assert generations(fleet)["current"] == first
    assert as_user(fleet, "cat ~/.config/fleet/version") == "1"
    assert last_activation(fleet).endswith(f"activated {first} (driver version 1)")
    # The plan reads the same profile: rolled back from the newest generation.
    plan = fleet.deploy(flake, deploy_file="deploy/plan.py").report["home1"]["plan"]
    drift = [line.strip() for line in plan if "drift:" in line]
    assert "drift: its profile selects generation 1, not the newest (2): rolled back" in drift, plan


def test_a_failed_activation_rolls_the_profile_back(fleet, flake):
    before = generations(fleet)
    set_host(flake, "home1", version="broken", failActivation=True)
    try:
        result = fleet.deploy(flake)
    finally:
        set_host(flake, "home1", version="1", failActivation=None)
    assert result.status("home1") == "failed"
    assert "rolled back to " + before["current"] in result.report["home1"]["error"]
    assert generations(fleet) == before
    assert as_user(fleet, "cat ~/.config/fleet/version") == "1"


def test_a_user_whose_profile_is_where_old_nix_kept_it(fleet, flake):
    """The user's home-manager profile is in the per-user directory (Nix before 2.14), with
    one generation: on Nix 2.26 it moves, generations and all, to ~/.local/state/nix/profiles
    and the old links are gone, as home-manager's activation moves it; on Nix 2.8 it stays."""
    old = evaluate(flake, "home1")
    fleet.ssh(
        "home1",
        f"rm -rf ~{USER}/.local/state ~{USER}/.nix-profile {OLD_PROFILES}/home-manager*; "
        f"mkdir -p {OLD_PROFILES} && chown {USER} {OLD_PROFILES}",
    )
    # The user's state as home-manager left it then (Nix 2.26's nix-env also makes the new
    # directory: remove it, as it was before Nix was upgraded).
    as_user(
        fleet,
        f"nix-env -p {OLD_PROFILES}/home-manager --set {old} && "
        f"mkdir -p ~/.local/state/home-manager/gcroots && "
        f"ln -s {old} ~/.local/state/home-manager/gcroots/current-home && "
        "rm -rf ~/.local/state/nix ~/.nix-profile",
    )
    set_host(flake, "home1", version="3")
    new = evaluate(flake, "home1")
    result = fleet.deploy(flake)
    assert result.status("home1") == "changed", result.output
    listed = generations(fleet)
    assert listed == {
        "home-manager-1-link": old,
        "home-manager-2-link": new,
        "current": new,
        "dir": profiles_dir(fleet),
    }
    left = as_user(fleet, f"ls {OLD_PROFILES}")
    assert left == (
        "" if fleet.nix == "nix-2.26" else "home-manager\nhome-manager-1-link\nhome-manager-2-link"
    )

    result = fleet.deploy(flake, deploy_file="deploy/rollback.py")
    assert result.status("home1") == "changed", result.output
    assert generations(fleet)["current"] == old


def test_a_generation_from_before_home_manager_25_11_sets_its_own_profile(fleet, flake):
    """No gen-version: `home-manager switch` only activates it, and it makes its generation."""
    before = generations(fleet)
    set_host(flake, "home1", version="legacy", legacyHomeManager=True)
    try:
        legacy = evaluate(flake, "home1")
        result = fleet.deploy(flake)
    finally:
        set_host(flake, "home1", legacyHomeManager=None)
    assert result.status("home1") == "changed", result.output
    listed = generations(fleet)
    assert listed["current"] == legacy
    assert len(listed) == len(before) + 1  # one generation, its own
    assert last_activation(fleet).endswith(f"activated {legacy} (driver version 0)")
