"""Getting the run's sudo password, and keeping it out of what is printed (flakefleet.sudo, as
the Target uses it)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from flakefleet import sudo
from flakefleet.target import Target


def deploy_user(passwords: sudo.Passwords | None = None, name: str = "web1", **data) -> Target:
    return Target.from_data(
        name, {"ssh_user": "deploy", "machine_class": "nixos", **data}, passwords
    )


def test_who_needs_sudo():
    assert deploy_user().needs_sudo
    assert deploy_user(machine_class="darwin").needs_sudo
    assert not deploy_user(ssh_user="root").needs_sudo
    assert not deploy_user(machine_class="home").needs_sudo  # its profile is its user's


def test_the_password_command_runs_once_and_the_password_goes_on_stdin_only(tmp_path):
    runs = tmp_path / "runs"
    passwords = sudo.Passwords()
    command = f"echo >> {runs}; printf 's3cret\\n'"
    web1 = deploy_user(passwords, sudo_password_command=command)
    web2 = deploy_user(passwords, "web2", sudo_password_command=command)
    assert web1.become is sudo.Become.SUDO
    web1.obtain_password()
    web2.obtain_password()
    assert runs.read_text() == "\n"
    invocation = web1.invocation("cat", stdin="input\n")
    assert invocation.stdin is not None and invocation.stdin.text == "s3cret\ninput\n"
    assert "s3cret" not in invocation.command
    assert "s3cret" not in f"{invocation} {invocation.stdin} {invocation.stdin!r}"


def test_a_failing_password_command_does_not_repeat_its_output():
    web1 = deploy_user(sudo_password_command="echo s3cret-partial; exit 3")
    with pytest.raises(sudo.SudoError) as caught:
        web1.obtain_password()
    assert str(caught.value) == "web1: sudo_password_command failed (exit 3)"


def test_without_a_terminal_it_names_the_setting():
    probe = "from flakefleet import sudo; sudo.Passwords().obtain('', 'deploy', 'web1')"
    completed = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, start_new_session=True,
        stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    assert "no terminal to ask on; set sudo_password_command" in completed.stderr


def test_each_password_command_gives_its_machines_their_password():
    passwords = sudo.Passwords()
    web = deploy_user(passwords, sudo_password_command="echo web-password")
    mac = deploy_user(
        passwords, "mac1", sudo_password_command="echo mac-password", machine_class="darwin"
    )
    web.obtain_password()
    assert mac.become is sudo.Become.SUDO  # not web's password
    mac.obtain_password()
    assert mac.invocation("true").stdin == sudo.Stdin("mac-password\n")
    assert web.invocation("true").stdin == sudo.Stdin("web-password\n")


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
    mac1 = deploy_user(machine_class="darwin", remote_nix_dir=str(tmp_path))
    invocation = mac1.invocation("nix")
    assert invocation.command.startswith("sudo -n sh -c")
    completed = subprocess.run(["sh", "-c", invocation.command], capture_output=True, text=True)
    assert completed.stdout == "the machine nix\n"
