"""Build placement, builders and cache machines, and what a wrong build says."""

from pathlib import Path

import pytest

from flakefleet import builds
from flakefleet.settings import MachineSettings
from flakefleet.target import Target

NEW, OLD = "/nix/store/new-system", "/nix/store/old-system"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, builds.Placement("local")),
        ("local", builds.Placement("local")),
        ("target", builds.Placement("target")),
        ("build1", builds.Placement("builder", "build1")),
        (
            "ssh://nix@builder.example.org",
            builds.Placement("builder", "ssh://nix@builder.example.org"),
        ),
        ("ssh-ng://builder", builds.Placement("builder", "ssh-ng://builder")),
    ],
)
def test_build_on_settings(value, expected):
    assert builds.placement(value, {"build1", "web1"}) == expected


def test_build_on_rejects_what_it_cannot_reach():
    with pytest.raises(ValueError, match=r"build_on: 'bulid1' is not local, target, a fleet"):
        builds.placement("bulid1", {"build1"})


def test_peer_from_a_url_uses_the_users_own_ssh_settings():
    build1 = Target.from_data("build1", {"ssh_hostname": "10.0.0.9", "ssh_user": "root"})
    fleet = builds.FleetBuilds(
        Path("/repo"), Path("fleet.yaml"), {"build1": build1}, lambda name: MachineSettings()
    )
    peer = fleet.peer("ssh-ng://nix@builder.example.org")
    assert (peer.name, peer.protocol) == ("builder.example.org", "ssh-ng")
    assert peer.store == "ssh-ng://nix@builder.example.org"
    assert fleet.peer("build1").store == "ssh://root@10.0.0.9"


def test_a_mismatch_names_both_paths():
    assert builds.mismatch("web1", [OLD], NEW) == (
        f"build on web1 gave {OLD}, but the flake evaluates to {NEW} here"
    )
