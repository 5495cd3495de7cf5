"""A machine as flakefleet reaches it: the one handle every command on a machine goes through.

A `Target` is made once per machine and run from its pyinfra data. It knows how to log in
(address, port, key, known hosts), who the SSH user is, where the machine keeps Nix and its
generations, and how a command becomes root there (sudo, with the run's password). Every
remote command is built by `invocation`, which sets PATH and privilege in one place; it then
travels one of three ways, all here:

- `run`: over a new OpenSSH connection (waiting on a detached activation after pyinfra's
  connection dropped, confirming over a *new* login, checks, reboots, builders);
- `command` (yielded by an operation) or `run_over` (now, in a FunctionCommand), `read`
  (a fact) and `run_as_login` (the smoke checks' batches): over pyinfra's own connection;
- the options and URLs other programs use to reach it: rsync (`rsync_shell`), Nix
  (`ssh_options` for ``NIX_SSHOPTS``, `store_url`) and the smoke checks (`ssh_options`).
"""

from __future__ import annotations

import contextlib
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pyinfra.api import FactBase, StringCommand

from flakefleet import sudo
from flakefleet.models import (
    RUNNING_SYSTEM,
    SOURCES_ROOT,
    SYSTEM_PROFILE,
    USER_SOURCES_ROOT,
    MachineClass,
)
from flakefleet.process import run

# Notice a dead peer within ~15 s instead of waiting on TCP for minutes.
KEEPALIVE = [
    "-o",
    "ServerAliveInterval=5",
    "-o",
    "ServerAliveCountMax=3",
    "-o",
    "ConnectTimeout=10",
]

# Where a home-manager user's profiles are, found on the machine as home-manager's own tool
# finds them (home-manager/home-manager, setHomeManagerPathVariables): after `nix-env -q`, which
# makes ~/.local/state/nix/profiles on Nix 2.14 and later (earlier, the daemon makes the per-user
# directory), in that directory when it exists, else in /nix/var/nix/profiles/per-user/<user>.
# `nix-env -q` only runs while the first does not exist: once it does, it is the answer. Every
# command to a home-manager machine sets it (`Target.invocation`), so its paths expand there.
HOME_PROFILES = "$FLAKEFLEET_PROFILES"
HOME_PROFILES_COMMAND = (
    'FLAKEFLEET_PROFILES="${XDG_STATE_HOME:-$HOME/.local/state}/nix/profiles"; '
    '[ -d "$FLAKEFLEET_PROFILES" ] || { nix-env -q >/dev/null 2>&1; '
    'o="/nix/var/nix/profiles/per-user/$(id -un)"; '
    '[ -d "$FLAKEFLEET_PROFILES" ] || [ ! -d "$o" ] || FLAKEFLEET_PROFILES=$o; }'
)

# The Nix profile holding each class's generations (home-manager's is the SSH user's own).
PROFILES = {
    MachineClass.NIXOS: SYSTEM_PROFILE,
    MachineClass.DARWIN: SYSTEM_PROFILE,
    MachineClass.HOME: f"{HOME_PROFILES}/home-manager",
}

T = TypeVar("T")


class RemoteFact(FactBase[T]):
    """A fact whose shell script `Target.read` wraps like any other command (Nix on PATH,
    sudo) before pyinfra runs it: `script` is the fact's own shell, `command` the wrapped one.

    On its own (``pyinfra inventory.py fact ...``) it runs its script with the defaults.
    """

    @staticmethod
    def script(**arguments: Any) -> str:
        raise NotImplementedError

    def command(self, command: str | None = None) -> str:
        return self.script() if command is None else command


class Unreachable(RuntimeError):
    """No SSH connection could be made, or it broke before the command finished."""


@dataclass
class Tally:
    """What flakefleet itself sent a machine in one run (its deploy record): new SSH logins
    (`run`, rsync) and commands over pyinfra's open connection. Nix's own copies are not in
    it."""

    logins: int = 0
    commands: int = 0
    checks: int = 0  # the smoke checks' batches sent over pyinfra's connection


@dataclass(frozen=True)
class Target:
    """How to reach one machine and run commands on it, as its SSH user or as root."""

    name: str
    address: str
    machine_class: MachineClass = MachineClass.NIXOS
    ssh_user: str | None = None
    port: int | None = None
    key: str | None = None
    known_hosts: str | None = None
    strict_host_key_checking: str | None = None
    ssh_config: str | None = None
    nix_dir: str | None = None  # where Nix is when the machine's sessions lack it (macOS)
    password_source: str = ""  # its sudo_password_command, or "" for the terminal
    passwords: sudo.Passwords = field(
        default_factory=sudo.Passwords, compare=False, repr=False, hash=False
    )
    tally: Tally = field(default_factory=Tally, compare=False, repr=False, hash=False)

    @classmethod
    def from_data(
        cls, name: str, data: Mapping[str, Any], passwords: sudo.Passwords | None = None
    ) -> Target:
        """A machine's target from its pyinfra host data (the fleet file's `address`, `port`,
        `user`, `class`, its `ssh` settings, and `remote_nix_dir`)."""

        def text(key: str) -> str | None:
            value = data.get(key)
            return str(value) if value else None

        return cls(
            name=name,
            address=text("ssh_hostname") or name,
            machine_class=MachineClass(data.get("machine_class") or MachineClass.NIXOS),
            ssh_user=text("ssh_user"),
            port=int(str(data.get("ssh_port"))) if data.get("ssh_port") else None,
            key=text("ssh_key"),
            known_hosts=text("ssh_known_hosts_file"),
            strict_host_key_checking=text("ssh_strict_host_key_checking"),
            ssh_config=text("ssh_config_file"),
            nix_dir=text("remote_nix_dir"),
            password_source=text("sudo_password_command") or "",
            passwords=passwords or sudo.Passwords(),
        )

    # -- what the machine is ----------------------------------------------------------------

    @property
    def user(self) -> str:
        """The SSH user (root unless the fleet file says otherwise)."""
        return self.ssh_user or "root"

    @property
    def profile(self) -> str:
        """The profile holding the machine's generations: the system's, or a home-manager
        user's own (a path that expands on the machine: use it through `shell_path`)."""
        return PROFILES[self.machine_class]

    @property
    def running_link(self) -> str:
        """What links to the system it runs (a home-manager machine runs what its profile
        selects)."""
        return self.profile if self.machine_class is MachineClass.HOME else RUNNING_SYSTEM

    @property
    def state_dir(self) -> str:
        """Where flakefleet keeps its runtime files on the machine (locks, activations).

        Under /run, so a reboot clears them; a home-manager machine is deployed without root,
        so its user's files live in /tmp.
        """
        if self.machine_class is MachineClass.HOME:
            return f"/tmp/flakefleet-{self.ssh_user or 'user'}"
        return "/run/flakefleet"

    @property
    def sources_root(self) -> str:
        """Where the deploy keeps the machine's sources: /var/src, or a home-manager user's
        own (`$HOME` expanded on the machine)."""
        if self.machine_class is MachineClass.HOME:
            return USER_SOURCES_ROOT
        return SOURCES_ROOT

    @property
    def history(self) -> str:
        """The machine's deploy history: one JSON line per activation (`flakefleet.records`),
        kept across reboots and readable by its owner only; a home-manager user's own
        (`~` is the login's home, expanded on the machine)."""
        if self.machine_class is MachineClass.HOME:
            return "~/.local/state/flakefleet/history.jsonl"
        return "/var/lib/flakefleet/history.jsonl"

    def nix(self, program: str = "nix") -> str:
        """A Nix program on the machine: from `nix_dir` when its sessions lack Nix on PATH."""
        return f"{self.nix_dir.rstrip('/')}/{program}" if self.nix_dir else program

    # -- privilege ---------------------------------------------------------------------------

    @property
    def needs_sudo(self) -> bool:
        """Whether its privileged commands go through sudo (a home-manager machine needs no
        root: its profile is its user's)."""
        return self.user != "root" and self.machine_class is not MachineClass.HOME

    @property
    def become(self) -> sudo.Become:
        """How its commands become root now: with the password once the run has one."""
        if not self.needs_sudo:
            return sudo.Become.ROOT
        if self.passwords.get(self.password_source) is None:
            return sudo.Become.SUDO
        return sudo.Become.SUDO_PASSWORD

    def obtain_password(self) -> None:
        """Have the run get this machine's sudo password (once per run); raises SudoError."""
        self.passwords.obtain(self.password_source, self.user, self.name)

    def invocation(
        self, script: str, *, as_root: bool = True, stdin: str | None = None, gate: bool = False
    ) -> sudo.Invocation:
        """A shell script as the machine runs it: Nix on PATH, as root when asked (through
        sudo, with the password first on standard input when sudo gets it), then `stdin`.

        `gate`: if sudo would refuse, print `sudo.REFUSED` and its reason instead (the
        preflight's way to learn that it needs a password without failing the connection).
        """
        if self.machine_class is MachineClass.HOME:
            script = f"{HOME_PROFILES_COMMAND}; {script}"
        script = sudo.nix_on_path(self.nix_dir, script)
        become = self.become if as_root else sudo.Become.ROOT
        command = sudo.gate(become, script) if gate else sudo.wrap(become, script)
        if become is sudo.Become.SUDO_PASSWORD:
            password = self.passwords.get(self.password_source)
            assert password is not None
            return sudo.Invocation(command, sudo.Stdin(password + "\n" + (stdin or "")))
        return sudo.Invocation(command, None if stdin is None else sudo.Stdin(stdin))

    # -- over a new OpenSSH connection -------------------------------------------------------

    def run(
        self,
        script: str,
        *,
        as_root: bool = True,
        stdin: str | None = None,
        timeout: float | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a shell script on the machine over a new SSH connection (as root unless
        `as_root` is False), with `stdin` on its standard input.

        Raises Unreachable when ssh itself fails (exit 255) or the timeout passes.
        """
        invocation = self.invocation(script, as_root=as_root, stdin=stdin)
        argv = ["ssh", *self.ssh_options(), *KEEPALIVE, self.destination, invocation.command]
        self.tally.logins += 1
        text = invocation.stdin.text if invocation.stdin else None
        try:
            completed = run(argv, stdin=text, check=False, timeout=timeout)
        except subprocess.TimeoutExpired as error:
            raise Unreachable(f"no answer from {self.name} within {timeout:.0f}s") from error
        if completed.returncode == 255:
            detail = completed.stderr.strip().splitlines()[-1:] or ["connection failed"]
            raise Unreachable(f"ssh to {self.name} failed: {detail[0]}")
        return completed

    # -- over pyinfra's connection -------------------------------------------------------------

    def command(
        self, script: str, *, as_root: bool = True, stdin: str | None = None
    ) -> StringCommand:
        """A shell script for an operation to yield: pyinfra runs it on its connection (with
        `stdin`, which pyinfra never prints)."""
        invocation = self.invocation(script, as_root=as_root, stdin=stdin)
        self.tally.commands += 1
        if invocation.stdin is None:
            return StringCommand(invocation.command)
        return StringCommand(invocation.command, _stdin=invocation.stdin)  # type: ignore[arg-type]

    def run_over(
        self, host: Any, script: str, *, as_root: bool = True, stdin: str | None = None
    ) -> tuple[bool, Any]:
        """Run a shell script now over pyinfra's connection to the machine (in a
        FunctionCommand), with `stdin`; pyinfra's success flag and output."""
        invocation = self.invocation(script, as_root=as_root, stdin=stdin)
        self.tally.commands += 1
        return host.run_shell_command(StringCommand(invocation.command), _stdin=invocation.stdin)

    def run_as_login(self, host: Any, script: str, timeout: float) -> tuple[bool, Any]:
        """Run a smoke checks' script now over pyinfra's connection, as their own `ssh` login
        runs it: as the SSH user, nothing added (no PATH, no sudo); pyinfra's success flag and
        output. (pyinfra runs it with `sh -c`: the script must be POSIX shell.) Raises
        pyinfra's timeout error after `timeout` seconds."""
        self.tally.checks += 1
        return host.run_shell_command(StringCommand(script), _timeout=timeout)

    def read(
        self, host: Any, fact: type[RemoteFact[T]], *, as_root: bool, gate: bool = False,
        **arguments: Any,
    ) -> T:  # fmt: skip
        """Read a fact over pyinfra's connection: its script, wrapped like every other command
        (`gate`: see `invocation`)."""
        invocation = self.invocation(fact.script(**arguments), as_root=as_root, gate=gate)
        self.tally.commands += 1
        return host.get_fact(fact, invocation.command, _stdin=invocation.stdin)

    def read_as_root(self, host: Any, fact: type[RemoteFact[T]], **arguments: Any) -> T:
        """Read a fact as root, gated (see `invocation`): the sudo password is got first when
        the run will need it from a command, or when sudo says it needs one (then the fact is
        read again). Raises SudoError when no password can be had; else the fact's value says
        why sudo refused, if it did (its `sudo_refusal`)."""
        if self.needs_sudo and self.password_source:
            self.obtain_password()  # on the controller: saves a round trip
        found = self.read(host, fact, as_root=True, gate=True, **arguments)
        refusal = getattr(found, "sudo_refusal", None)
        if refusal and sudo.wants_password(refusal):
            self.obtain_password()
            found = self.read(host, fact, as_root=True, gate=True, **arguments)
        return found

    # -- for other programs ------------------------------------------------------------------

    @property
    def destination(self) -> str:
        """`user@address` (the address alone when no user is set)."""
        return f"{self.ssh_user}@{self.address}" if self.ssh_user else self.address

    def ssh_options(self) -> list[str]:
        """`ssh` options (no destination), shared by rsync, Nix and the smoke checks: the same
        address, port, key and host-key policy as pyinfra's own connection."""
        # OpenSSH 8.5 to 9.8 prefer sntrup761x25519, which costs about 0.1 s of CPU at each
        # end of every connection (0.25 s in all for a loopback `ssh true`, 0.12 s without):
        # a fleet's worth of them is seconds. pyinfra's own connection, which carries the same
        # commands and keys, makes a curve25519 exchange; OpenSSH's other defaults stay.
        options = ["-o", "BatchMode=yes", "-o", "KexAlgorithms=-sntrup*"]
        if self.ssh_config:
            options[:0] = ["-F", self.ssh_config]
        if self.port:
            options += ["-p", str(self.port)]
        if self.key:
            options += ["-i", self.key, "-o", "IdentitiesOnly=yes"]
        if self.known_hosts:
            options += ["-o", f"UserKnownHostsFile={self.known_hosts}"]
        if self.strict_host_key_checking:
            options += ["-o", f"StrictHostKeyChecking={self.strict_host_key_checking}"]
        return options

    def relay_options(self) -> list[str]:
        """`ssh` options for another machine (a builder or cache) to reach this one.

        Only the port: keys and known hosts are that machine's own, as for Nix remote builders.
        """
        options = ["-o", "BatchMode=yes"]
        if self.port:
            options += ["-p", str(self.port)]
        return options

    def store_url(self, protocol: str = "ssh", *, compress: bool = False) -> str:
        """Its Nix store over SSH, e.g. ``ssh-ng://root@web1?compress=true``; with Nix from
        `nix_dir` when its sessions lack it."""
        if protocol not in ("ssh", "ssh-ng"):
            raise ValueError(f"copy_protocol must be ssh or ssh-ng, not {protocol!r}")
        parameters = []
        if compress:
            parameters.append("compress=true")
        if self.nix_dir:
            program = "nix-daemon" if protocol == "ssh-ng" else "nix-store"
            parameters.append(f"remote-program={self.nix(program)}")
        query = "?" + "&".join(parameters) if parameters else ""
        return f"{protocol}://{self.destination}{query}"

    @contextmanager
    def rsync_shell(self) -> Iterator[tuple[list[str], tuple[int, ...]]]:
        """rsync's remote shell (`--rsh`, as argv) and the descriptors rsync must inherit.

        When sudo wants the password, it comes from a pipe through the relay
        `flakefleet.rsh`, ahead of rsync's stream: never in a command line.
        """
        ssh = ["ssh", *self.ssh_options(), *KEEPALIVE]
        self.tally.logins += 1
        if self.become is not sudo.Become.SUDO_PASSWORD:
            yield ssh, ()
            return
        with self.passwords.pipe(self.password_source) as password:
            yield [sys.executable, "-m", "flakefleet.rsh", str(password), *ssh], (password,)

    def rsync_path(self, prepare: str) -> str:
        """rsync's remote half (`--rsync-path`): run `prepare`, then receive, as root.

        rsync appends its server's arguments to this; under sudo they reach `sh -c` as "$@".
        """
        become = self.become
        if become is sudo.Become.ROOT:
            return f"{prepare} && rsync"
        return sudo.wrap(become, f'{prepare} && exec rsync "$@"') + " rsync"

    def reconnect(self, host: Any, reason: str) -> bool:
        """Give pyinfra a new connection to the machine after its old one was cut (a reboot,
        a dropped network), so the run's later steps still reach it. Returns whether it
        worked."""
        with contextlib.suppress(Exception):
            host.disconnect()
        host.connected = False
        try:
            host.connect(reason=reason, raise_exceptions=True)
        except Exception:  # pyinfra raises ConnectError, paramiko its own errors
            return False
        return True


def shell_path(path: str) -> str:
    """A path as one shell word; a leading variable (``$HOME/``: a user's sources,
    ``$FLAKEFLEET_PROFILES/``: a home-manager profile) stays expandable."""
    match = re.match(r"\$([A-Za-z_][A-Za-z0-9_]*)/", path)
    if match:
        return f'"${match.group(1)}"/' + shlex.quote(path[match.end() :])
    return shlex.quote(path)
