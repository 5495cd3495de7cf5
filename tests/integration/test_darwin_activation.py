"""nix-darwin activation as darwin-rebuild does it (pkgs/nix-tools/darwin-rebuild.sh).

- `darwin-rebuild check` exports `checkActivation=1` and runs `activate` (or, for a generation
  with a legacy `activate-user`, that one): it stops after the checks
  (modules/system/checks.nix). flakefleet's `dry-activate` is that, and changes nothing.
- A generation from before nix-darwin 25.05 has an `activate-user` not marked
  `# nix-darwin: deprecated`: darwin-rebuild runs it as the user (`sudo --user="$SUDO_USER"
  --set-home`, or as itself before 25.05), before `activate`.

mac1 logs in as `deploy`, whose sudo asks for a password, as in the default fleet.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Fleet, evaluate, fleet_of, set_host

STATE = (
    "readlink -f /run/current-system; readlink -f /nix/var/nix/profiles/system; "
    "ls /nix/var/nix/profiles/ | grep -c '^system-'; cat /etc/fleet-release; "
    "wc -l < /var/log/activations.log; cat ~deploy/.fleet-user-activation 2>/dev/null || echo none"
)


@pytest.fixture(scope="module")
def fleet(flake: Path) -> Iterator[Fleet]:
    with fleet_of(flake, "mac1") as testbed:
        yield testbed


def state(fleet: Fleet) -> list[str]:
    return fleet.ssh("mac1", STATE).splitlines()


def test_dry_activate_runs_the_checks_and_changes_nothing(fleet, flake):
    assert fleet.deploy(flake).status("mac1") == "changed"
    before = state(fleet)
    set_host(flake, "mac1", version="checked")
    result = fleet.deploy(flake, deploy_file="deploy/dry-activate.py")
    assert result.returncode == 0, result.output
    assert state(fleet) == before
    log = fleet.ssh("mac1", "cat $(ls -td /run/flakefleet/activation/*/ | head -1)log")
    assert "checking the system..." in log and "\nok\n" in log, log


def test_a_generation_from_before_25_05_runs_activate_user_as_the_user(fleet, flake):
    set_host(flake, "mac1", version="legacy", legacyActivateUser=True)
    system = evaluate(flake, "mac1")
    result = fleet.deploy(flake)
    assert result.status("mac1") == "changed", result.output
    assert state(fleet)[:2] == [system, system]
    assert fleet.ssh("mac1", "cat ~deploy/.fleet-user-activation") == f"deploy {system}"
    assert fleet.ssh("mac1", "stat -c %U ~deploy/.fleet-user-activation") == "deploy"


def test_its_dry_activate_runs_only_its_checks_as_the_user(fleet, flake):
    before = state(fleet)
    set_host(flake, "mac1", version="legacy-checked", legacyActivateUser=True)
    result = fleet.deploy(flake, deploy_file="deploy/dry-activate.py")
    assert result.returncode == 0, result.output
    assert state(fleet) == before
