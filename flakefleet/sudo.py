"""Root on machines whose SSH user is not root, through sudo, with its password asked once.

A machine whose fleet-file `user` is not root runs flakefleet's privileged commands (lock,
activation, sources, pruning, checks) through sudo; a home-manager machine (class `home`)
needs no root. When sudo asks for a password, flakefleet gets it once per run, from the
terminal or from the fleet's `sudo_password_command` (runs without a terminal), and hands it
to each command on its standard input:

    IFS= read -r FLAKEFLEET_SUDO_PASSWORD && export FLAKEFLEET_SUDO_PASSWORD &&
    SUDO_ASKPASS="$(command -v printenv)" sudo -A -p FLAKEFLEET_SUDO_PASSWORD sh -c '...'

sudo runs its askpass helper with the prompt as argument, so `printenv
FLAKEFLEET_SUDO_PASSWORD` answers with the password: it is never in a command line (every
user of the machine can read those, which is where pyinfra's own `_sudo_password` puts it),
a file or a log, and sudo removes the variable before running the command. `read` takes the
line whether sudo asks or not, so the same command works where sudo needs no password.
"""

from __future__ import annotations

import getpass
import os
import shlex
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum

from flakefleet.process import CommandError, run

PASSWORD_VARIABLE = "FLAKEFLEET_SUDO_PASSWORD"
# The line a gated command prints instead of running when sudo will not run it.
REFUSED = "@@flakefleet-sudo "
# How sudo (and sudo-rs) say that it needs a password it may not ask for (`-n`).
_PASSWORD_REQUIRED = ("a password is required", "interactive authentication is required")


class SudoError(RuntimeError):
    """No sudo password could be had; the message is one line a user can act on."""


class Become(StrEnum):
    """How a command becomes root on a machine."""

    ROOT = "root"  # logged in as root, or a home-manager machine: no sudo
    SUDO = "sudo"  # sudo, which must not ask for a password (`sudo -n`)
    SUDO_PASSWORD = "sudo with the password"  # the run's password on standard input


def wrap(become: Become, command: str) -> str:
    """`command` (a shell command) run as root the way `become` says."""
    if become is Become.ROOT:
        return command
    return _read_password(become) + _sudo(become, command)


def gate(become: Become, command: str) -> str:
    """Like `wrap`, but if sudo would refuse, print REFUSED and sudo's reason instead (exit 0).

    The preflight runs this: its answer tells whether to ask for a password, or why sudo
    refused (a wrong password, a user who is no sudoer), without failing the connection.
    """
    if become is Become.ROOT:
        return command
    check = _sudo(become, "true")
    refused = f"printf '%s%s\\n' {shlex.quote(REFUSED)} \"$(printf '%s\\n' \"$why\" | tail -n1)\""
    return (
        f"{_read_password(become)}"
        f"if why=$({check} 2>&1); then {_sudo(become, command)}; else {refused}; fi"
    )


def _read_password(become: Become) -> str:
    if become is not Become.SUDO_PASSWORD:
        return ""
    return f"IFS= read -r {PASSWORD_VARIABLE} && export {PASSWORD_VARIABLE} && "


def _sudo(become: Become, command: str) -> str:
    if become is Become.SUDO:
        return f"sudo -n sh -c {shlex.quote(command)}"
    # The variable is gone from the command's environment unless sudoers keeps it: drop it.
    command = f"unset {PASSWORD_VARIABLE}; {command}"
    return (
        f'SUDO_ASKPASS="$(command -v printenv)" sudo -A -p {PASSWORD_VARIABLE} '
        f"sh -c {shlex.quote(command)}"
    )


def wants_password(refusal: str) -> bool:
    """Whether sudo refused only because it needs a password."""
    return any(reason in refusal for reason in _PASSWORD_REQUIRED)


@dataclass(frozen=True)
class Stdin:
    """Standard input that may hold the sudo password: it never shows when printed or logged.

    pyinfra reads it through `readlines`; a subprocess gets `text`.
    """

    text: str = field(repr=False)

    def readlines(self) -> list[str]:
        return self.text.splitlines(keepends=True)

    def __iter__(self) -> Iterator[str]:
        return iter(self.readlines())

    def __str__(self) -> str:
        return "<standard input>"


@dataclass(frozen=True)
class Invocation:
    """A command for a machine's shell, and the standard input it needs."""

    command: str
    stdin: Stdin | None


def nix_on_path(nix_dir: str | None, command: str) -> str:
    """`command` with the machine's Nix first on PATH when its sessions lack it (nix-darwin).

    Set inside sudo's shell: sudo replaces PATH with its own `secure_path`.
    """
    if not nix_dir:
        return command
    return f"PATH={shlex.quote(nix_dir)}:$PATH; export PATH; {command}"


class Passwords:
    """The sudo passwords of one run, by where they come from: a `sudo_password_command`, or
    "" for the terminal (asked once, for every machine without a command)."""

    def __init__(self) -> None:
        self._passwords: dict[str, str] = {}
        self._lock = threading.Lock()

    def get(self, source: str) -> str | None:
        return self._passwords.get(source)

    def obtain(self, source: str, user: str, machine: str) -> None:
        """Get the password for `source` once per run: from the command (a controller command
        that prints it, e.g. `pass show fleet/sudo`), else from the terminal.

        Raises SudoError when neither works; no machine is touched by this.
        """
        with self._lock:
            if source not in self._passwords:
                if source:
                    self._passwords[source] = _from_command(source, machine)
                else:
                    self._passwords[source] = _from_terminal(user, machine)

    @contextmanager
    def pipe(self, source: str) -> Iterator[int]:
        """A pipe holding a password line, for a local helper (the rsync relay) to read from an
        inherited descriptor: the password stays out of its command line and environment."""
        password = self.get(source)
        assert password is not None
        read, write = os.pipe()
        try:
            os.write(write, (password + "\n").encode())  # one line fits in a pipe's buffer
        finally:
            os.close(write)
        try:
            yield read
        finally:
            os.close(read)


def _from_command(command: str, machine: str) -> str:
    try:
        completed = run(["sh", "-c", command], timeout=120)
    except CommandError as error:
        # Its output may hold (part of) the password: say only that it failed.
        raise SudoError(
            f"{machine}: sudo_password_command failed (exit {error.returncode})"
        ) from None
    password = completed.stdout.removesuffix("\n")
    if not password or "\n" in password:
        raise SudoError(f"{machine}: sudo_password_command must print the password as one line")
    return password


def _from_terminal(user: str, machine: str) -> str:
    try:  # getpass falls back to an echoing stdin without a terminal: never let it
        with open("/dev/tty"):
            pass
    except OSError:
        raise SudoError(
            f"{machine}: sudo asks for a password and there is no terminal to ask on; "
            "set sudo_password_command in the fleet file's data"
        ) from None
    password = getpass.getpass(
        f"flakefleet: sudo password for {user} (asked once for this run, needed on {machine}): "
    )
    if not password:
        raise SudoError(f"{machine}: no sudo password given")
    return password
