"""Where systems are built and how closures travel: settings, Nix command lines, pruning."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from facts.machine import MachineState
from facts.nix import Generation
from flakefleet import builds, cache, nix
from operations.generations import generations_after

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
    peer = builds.peer("ssh-ng://nix@builder.example.org", {})
    assert (peer.name, peer.protocol) == ("builder.example.org", "ssh-ng")
    assert peer.store == "ssh-ng://nix@builder.example.org"
    fleet_peer = builds.peer("build1", {"build1": {"ssh_hostname": "10.0.0.9", "ssh_user": "root"}})
    assert fleet_peer.store == "ssh://root@10.0.0.9"


def test_a_mismatch_names_both_paths():
    assert builds.mismatch("web1", [OLD], NEW) == (
        f"build on web1 gave {OLD}, but the flake evaluates to {NEW} here"
    )


def test_cache_settings(tmp_path):
    served = {"store": "file://cache", "url": "http://127.0.0.1:8370", "serve": True}
    assert cache.parse(served, tmp_path, []) == cache.Cache(
        f"file://{tmp_path}/cache", "http://127.0.0.1:8370", True
    )
    assert cache.parse({"store": "s3://fleet"}, tmp_path, []) == cache.Cache(
        "s3://fleet", "s3://fleet"
    )
    assert cache.parse({"machine": "build1"}, tmp_path, ["build1"]) == cache.Cache(machine="build1")
    assert cache.parse(None, tmp_path, []) is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"machine": "nope"}, "machine 'nope' is not in the fleet"),
        ({"url": "http://x:1"}, "needs a store"),
        ({"store": "s3://b", "serve": True}, "serve needs a file:// store"),
        ({"store": "file:///c", "url": "http://127.0.0.1", "serve": True}, "needs a port"),
        ({"store": "file:///c", "ur": "x"}, "unknown field 'ur'"),
        ("file:///c", "expected a mapping"),
    ],
)
def test_bad_cache_settings(value, message):
    with pytest.raises(cache.CacheError, match=message):
        cache.parse(value, Path("/repo"), ["build1"])


def test_store_urls_take_only_nix_protocols():
    with pytest.raises(ValueError, match="ssh or ssh-ng"):
        nix.store_url("http", "web1")


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
    output = "error: cannot add path '/nix/store/x' because it lacks a valid signature\n"
    assert nix.copy_error(output).startswith(
        "the destination does not trust the closure's signatures"
    )
    assert nix.copy_error("error: writing to file: No space left on device") == (
        "error: writing to file: No space left on device"
    )
    assert nix.copied_count("copying 12 paths...\n") == 12


def test_remote_paths_are_quoted_for_the_remote_shell():
    """A path as the machine's shell sees it: $HOME expanded, anything else literal."""
    for path, seen in (("$HOME/.var/src/config", "/home/x/.var/src/config"), ("/a b", "/a b")):
        echoed = subprocess.run(
            ["sh", "-c", f"printf %s {nix.shell_path(path)}"],
            env={"HOME": "/home/x"}, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert echoed == seen


def test_classes_attributes_and_profiles():
    assert nix.configuration_attribute("home", "home1", "deploy") == [
        ["homeConfigurations", "deploy@home1", "activationPackage"],
        ["homeConfigurations", "deploy", "activationPackage"],
    ]
    assert nix.configuration_attribute("darwin", "mac1", "deploy") == [
        ["darwinConfigurations", "mac1", "system"]
    ]
    assert (
        nix.profile_path("home", "deploy") == "/nix/var/nix/profiles/per-user/deploy/home-manager"
    )
    assert nix.profile_path("darwin", "deploy") == "/nix/var/nix/profiles/system"


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


def generations(count: int) -> list[Generation]:
    return [Generation(n, "2026-11-22 03:00:00", n == count) for n in range(1, count + 1)]


@pytest.mark.parametrize(
    ("goal", "profile", "expected"),
    [("switch", OLD, 4), ("switch", NEW, 3), ("boot", OLD, 4), ("test", OLD, 3), ("build", OLD, 3)],
)
def test_generations_after_a_deploy(goal, profile, expected):
    machine = MachineState(profile_system=profile, generations=generations(3))
    assert generations_after(machine, NEW, goal) == expected
