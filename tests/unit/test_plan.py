"""What each goal considers already done, and the SSH options every tool shares."""

import subprocess

import pytest

from facts.machine import MachineState
from flakefleet.ssh import ssh_destination, ssh_options
from operations.activation import has_system
from operations.closure import has_closure

OLD, NEW = "/nix/store/old-system", "/nix/store/new-system"


@pytest.mark.parametrize(
    ("goal", "current", "profile", "done"),
    [
        ("switch", NEW, NEW, True),
        ("switch", NEW, OLD, False),
        ("switch", OLD, NEW, False),
        ("boot", OLD, NEW, True),
        ("boot", NEW, OLD, False),
        ("test", NEW, OLD, True),
        ("test", OLD, NEW, False),
        ("dry-activate", NEW, NEW, False),
        ("build", OLD, NEW, True),
        ("build", OLD, OLD, False),
    ],
)
def test_has_system(goal, current, profile, done):
    machine = MachineState(current_system=current, profile_system=profile)
    assert has_system(goal, machine, NEW) is done


def test_closure_is_present_when_running_or_selected():
    assert has_closure(MachineState(current_system=NEW), NEW)
    assert has_closure(MachineState(profile_system=NEW), NEW)
    assert not has_closure(MachineState(current_system=OLD, profile_system=OLD), NEW)


def test_ssh_options_keep_strict_host_key_checking(tmp_path):
    """What OpenSSH itself makes of the options every tool gets (`ssh -G` connects nowhere)."""
    key, known_hosts = tmp_path / "id", tmp_path / "known_hosts"
    key.write_text("")
    known_hosts.write_text("")
    data = {
        "ssh_hostname": "127.0.0.1",
        "ssh_user": "root",
        "ssh_port": 22401,
        "ssh_key": str(key),
        "ssh_known_hosts_file": str(known_hosts),
        "ssh_strict_host_key_checking": "yes",
    }
    completed = subprocess.run(
        ["ssh", "-G", *ssh_options(data), ssh_destination(data, "web1")],
        capture_output=True, text=True, check=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    config = {}
    for line in completed.stdout.splitlines():
        name, _, value = line.partition(" ")
        config.setdefault(name, []).append(value)
    assert config["hostname"] == ["127.0.0.1"] and config["user"] == ["root"]
    assert config["port"] == ["22401"]
    assert config["batchmode"] == ["yes"]  # never a prompt
    assert config["stricthostkeychecking"] == ["true"]
    assert config["userknownhostsfile"] == [str(known_hosts)]
    assert config["identitiesonly"] == ["yes"] and config["identityfile"][0] == str(key)
