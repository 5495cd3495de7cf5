"""The one handle every remote command goes through: how a machine is reached, what it is, and
that no other way to run a command on a machine remains in the code."""

import subprocess
from pathlib import Path

import pytest

from flakefleet.target import Target, shell_path

ROOT = Path(__file__).resolve().parents[2]
WEB1 = {
    "ssh_hostname": "127.0.0.1",
    "ssh_user": "root",
    "ssh_port": 22401,
    "ssh_key": "/k/id",
    "ssh_known_hosts_file": "/k/known_hosts",
    "ssh_strict_host_key_checking": "yes",
}


def test_ssh_options_keep_strict_host_key_checking(tmp_path):
    """What OpenSSH itself makes of the options every tool gets (`ssh -G` connects nowhere)."""
    key, known_hosts = tmp_path / "id", tmp_path / "known_hosts"
    key.write_text("")
    known_hosts.write_text("")
    web1 = Target.from_data(
        "web1", {**WEB1, "ssh_key": str(key), "ssh_known_hosts_file": str(known_hosts)}
    )
    completed = subprocess.run(
        ["ssh", "-G", *web1.ssh_options(), web1.destination],
        capture_output=True, text=True, check=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    config: dict[str, list[str]] = {}
    for line in completed.stdout.splitlines():
        name, _, value = line.partition(" ")
        config.setdefault(name, []).append(value)
    assert config["hostname"] == ["127.0.0.1"] and config["user"] == ["root"]
    assert config["port"] == ["22401"]
    assert config["batchmode"] == ["yes"]  # never a prompt
    assert config["stricthostkeychecking"] == ["true"]
    assert config["userknownhostsfile"] == [str(known_hosts)]
    assert config["identitiesonly"] == ["yes"] and config["identityfile"][0] == str(key)
    # Another machine reaching this one uses its own keys and known hosts: only the port.
    assert web1.relay_options() == ["-o", "BatchMode=yes", "-p", "22401"]


def test_store_urls():
    assert Target.from_data("web1", {"ssh_user": "root"}).store_url() == "ssh://root@web1"
    mac1 = Target.from_data("mac1", {"ssh_user": "deploy", "remote_nix_dir": "/nix/bin/"})
    assert mac1.store_url("ssh-ng", compress=True) == (
        "ssh-ng://deploy@mac1?compress=true&remote-program=/nix/bin/nix-daemon"
    )
    assert mac1.store_url("ssh").endswith("remote-program=/nix/bin/nix-store")
    with pytest.raises(ValueError, match="ssh or ssh-ng"):
        mac1.store_url("http")


def test_profiles_and_state_directories():
    home = Target.from_data("home1", {"ssh_user": "deploy", "machine_class": "home"})
    assert home.profile == "$FLAKEFLEET_PROFILES/home-manager"  # found on the machine
    assert home.running_link == home.profile  # a home-manager machine runs what it selects
    assert home.state_dir == "/tmp/flakefleet-deploy"
    mac1 = Target.from_data("mac1", {"ssh_user": "deploy", "machine_class": "darwin"})
    assert (mac1.profile, mac1.running_link) == (
        "/nix/var/nix/profiles/system",
        "/run/current-system",
    )


def test_remote_paths_are_quoted_for_the_remote_shell():
    """A path as the machine's shell sees it: $HOME expanded, anything else literal."""
    for path, seen in (("$HOME/.var/src/config", "/home/x/.var/src/config"), ("/a b", "/a b")):
        echoed = subprocess.run(
            ["sh", "-c", f"printf %s {shell_path(path)}"],
            env={"HOME": "/home/x"}, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert echoed == seen


def test_a_home_manager_profile_is_found_as_home_managers_tool_finds_it(tmp_path):
    """~/.local/state/nix/profiles when it exists, or once `nix-env -q` made it (Nix 2.14 and
    later); `nix-env -q` is not run when it exists already. (The per-user fallback needs the
    real /nix: the Nix 2.8 test machine holds it, tests/integration/test_home_manager.py.)"""
    home = Target.from_data("home1", {"ssh_user": "deploy", "machine_class": "home"})
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    nix_env = bin_dir / "nix-env"  # as Nix 2.14 and later: makes the user's profiles directory
    nix_env.write_text(
        '#!/bin/sh\necho ran >> "$HOME/ran"; mkdir -p "$HOME/.local/state/nix/profiles"\n'
    )
    nix_env.chmod(0o755)
    script = home.invocation(f"printf %s {shell_path(home.profile)}").command
    env = {"HOME": str(tmp_path), "PATH": f"{bin_dir}:/usr/bin:/bin"}
    for _ in range(2):
        found = subprocess.run(
            ["sh", "-c", script], env=env, capture_output=True, text=True, check=True
        ).stdout
        assert found == f"{tmp_path}/.local/state/nix/profiles/home-manager"
    assert (tmp_path / "ran").read_text() == "ran\n"  # once: the second found the directory
