"""Where systems are built and how closures travel: settings, Nix command lines, pruning."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest

from facts.machine import MachineState
from facts.nix import Generation
from flakefleet import builds, cache, nix
from flakefleet.ssh import relay_options
from operations.generations import generations_after, prune_command

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


def test_store_urls():
    assert nix.store_url("ssh", "root@web1") == "ssh://root@web1"
    assert nix.store_url("ssh-ng", "deploy@mac1", compress=True, nix_dir="/nix/bin") == (
        "ssh-ng://deploy@mac1?compress=true&remote-program=/nix/bin/nix-daemon"
    )
    assert nix.store_url("ssh", "mac1", nix_dir="/nix/bin/").endswith(
        "remote-program=/nix/bin/nix-store"
    )
    with pytest.raises(ValueError, match="ssh or ssh-ng"):
        nix.store_url("http", "web1")


def test_copy_flags():
    assert nix.copy_flags() == []
    assert nix.copy_flags(check_sigs=False) == ["--no-check-sigs"]
    # Before Nix 2.20, ssh-ng substitutes on the destination only with builders-use-substitutes.
    assert nix.copy_flags(substitute=True, protocol="ssh-ng") == [
        "--substitute-on-destination", "--option", "builders-use-substitutes", "true",
    ]  # fmt: skip
    assert nix.copy_flags(substitute=True) == ["--substitute-on-destination"]


def test_copy_errors_say_when_a_signature_was_refused():
    output = "error: cannot add path '/nix/store/x' because it lacks a valid signature\n"
    assert nix.copy_error(output).startswith(
        "the destination does not trust the closure's signatures"
    )
    assert nix.copy_error("error: writing to file: No space left on device") == (
        "error: writing to file: No space left on device"
    )
    assert nix.copied_count("copying 12 paths...\n") == 12


def test_commands_run_on_machines():
    fetch = shlex.split(nix.fetch_command("http://127.0.0.1:8370", [NEW], None))
    # The machine may have asked the cache before the upload: no remembered "absent".
    assert fetch[fetch.index("narinfo-cache-negative-ttl") + 1] == "0"
    assert fetch[-3:] == ["--from", "http://127.0.0.1:8370", NEW]
    assert "--no-check-sigs" in nix.fetch_command("http://c", [NEW], None, check_sigs=False)
    assert nix.remote_realise_command(["/nix/store/a.drv"], "/nix/bin") == (
        "/nix/bin/nix-store --realise --keep-going /nix/store/a.drv"
    )
    relay = nix.remote_copy_command([NEW], "ssh://root@127.0.0.1", ["-p", "22401"], None)
    assert relay.startswith("NIX_SSHOPTS='-p 22401' nix ")
    assert relay.endswith(f"copy --to ssh://root@127.0.0.1 {NEW}")
    build = nix.remote_build_command("/var/src/config", "web1", [["a", "b"]], None)
    assert build.startswith("FLAKEFLEET_FLAKE=$(readlink -f /var/src/config) nix ")
    assert nix.shell_path("$HOME/.var/src/config") == '"$HOME"/.var/src/config'
    assert nix.shell_path("/a b") == "'/a b'"
    assert relay_options({"ssh_port": 22401, "ssh_key": "/k", "ssh_known_hosts_file": "/kh"}) == [
        "-o", "BatchMode=yes", "-p", "22401",
    ]  # fmt: skip


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


def test_prune_command():
    # Which generations it deletes: tests/unit/test_upstream_logic.py runs it.
    command = prune_command("/p", 1, "/nix/bin")
    assert "/nix/bin/nix-env --profile /p --delete-generations" in command
    assert command.endswith("&& /nix/bin/nix-store --gc")
