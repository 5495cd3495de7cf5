"""Getting the run's sudo password, and keeping it out of what is printed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from flakefleet import sudo


@pytest.fixture(autouse=True)
def no_password(monkeypatch):
    """Each test starts as a run that has no password yet."""
    monkeypatch.setattr(sudo, "_passwords", {})


def deploy_user(**data):
    return {"ssh_user": "deploy", "machine_class": "nixos", **data}


def test_who_needs_sudo():
    assert sudo.needed(deploy_user())
    assert sudo.needed(deploy_user(machine_class="darwin"))
    assert not sudo.needed(deploy_user(ssh_user="root"))
    assert not sudo.needed(deploy_user(machine_class="home"))  # its profile is its user's


def test_the_password_command_runs_once_and_the_password_goes_on_stdin_only(tmp_path):
    runs = tmp_path / "runs"
    data = deploy_user(sudo_password_command=f"echo >> {runs}; printf 's3cret\\n'")
    assert sudo.how(data) is sudo.Become.SUDO
    sudo.obtain_password(data, "web1")
    sudo.obtain_password(data, "web2")
    assert runs.read_text() == "\n"
    invocation = sudo.as_root(data, "cat", "input\n")
    assert invocation.stdin is not None and invocation.stdin.text == "s3cret\ninput\n"
    assert "s3cret" not in invocation.command
    assert "s3cret" not in f"{invocation} {invocation.stdin} {invocation.stdin!r}"


def test_a_failing_password_command_does_not_repeat_its_output():
    data = deploy_user(sudo_password_command="echo s3cret-partial; exit 3")
    with pytest.raises(sudo.SudoError) as caught:
        sudo.obtain_password(data, "web1")
    assert str(caught.value) == "web1: sudo_password_command failed (exit 3)"


def test_without_a_terminal_it_names_the_setting():
    probe = "from flakefleet import sudo; sudo.obtain_password({'ssh_user': 'deploy'}, 'web1')"
    completed = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, start_new_session=True,
        stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    assert "no terminal to ask on; set sudo_password_command" in completed.stderr


def test_each_password_command_gives_its_machines_their_password():
    web = deploy_user(sudo_password_command="echo web-password")
    mac = deploy_user(sudo_password_command="echo mac-password", machine_class="darwin")
    sudo.obtain_password(web, "web1")
    assert sudo.how(mac) is sudo.Become.SUDO  # not web's password
    sudo.obtain_password(mac, "mac1")
    assert sudo.as_root(mac, "true").stdin == sudo.Stdin("mac-password\n")
    assert sudo.as_root(web, "true").stdin == sudo.Stdin("web-password\n")


@pytest.mark.parametrize(
    ("refusal", "asks"),
    [
        ("sudo: a password is required", True),
        ("sudo-rs: interactive authentication is required", True),
        ("sudo: 3 incorrect password attempts", False),
        ("deploy is not in the sudoers file.", False),
    ],
)
def test_only_a_missing_password_is_worth_asking_for(refusal, asks):
    assert sudo.wants_password(refusal) is asks


def test_the_machines_nix_is_on_path_inside_sudo(tmp_path):
    """sudo replaces PATH (secure_path): a nix-darwin machine's Nix must be put on it inside.
    Runs the real sudo of this computer (as root, it asks nothing)."""
    (tmp_path / "nix").write_text("#!/bin/sh\necho the machine nix\n")
    (tmp_path / "nix").chmod(0o755)
    data = deploy_user(machine_class="darwin", remote_nix_dir=str(tmp_path))
    invocation = sudo.as_root(data, "nix")
    assert invocation.command.startswith("sudo -n sh -c")
    completed = subprocess.run(["sh", "-c", invocation.command], capture_output=True, text=True)
    assert completed.stdout == "the machine nix\n"
