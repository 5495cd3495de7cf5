"""What each goal considers already done, and the SSH options every tool shares."""

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


def test_ssh_options_keep_strict_host_key_checking():
    data = {
        "ssh_hostname": "127.0.0.1",
        "ssh_user": "root",
        "ssh_port": 22401,
        "ssh_key": "/k/id",
        "ssh_known_hosts_file": "/k/known_hosts",
        "ssh_strict_host_key_checking": "yes",
    }
    assert ssh_options(data) == [
        "-o", "BatchMode=yes", "-p", "22401", "-i", "/k/id", "-o", "IdentitiesOnly=yes",
        "-o", "UserKnownHostsFile=/k/known_hosts", "-o", "StrictHostKeyChecking=yes",
    ]  # fmt: skip
    assert ssh_destination(data, "web1") == "root@127.0.0.1"
