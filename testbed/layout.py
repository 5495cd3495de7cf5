"""Where the test fleet keeps things: the state directory, ports and per-machine paths.

Standard library only: ``testbed.machine`` imports this inside a machine.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ROSTER = REPO_ROOT / "example" / "hosts.json"
DEFAULT_BASE_PORT = 22400

STATE_ENV = "FLAKEFLEET_TESTBED_STATE"
PORT_ENV = "FLAKEFLEET_TESTBED_PORT"
# Where the systemd machines' root file system is built once and kept, outside the repository
# (and outside any state directory, so every test fleet shares it).
CACHE_ENV = "FLAKEFLEET_TESTBED_CACHE"
DEFAULT_CACHE = "/var/cache/flakefleet"
# Set by a runner that lives in its own mount namespace: machines are then started from the
# mount namespace of this PID (normally the computer's own), never from the runner's.
OUTER_PID_ENV = "FLAKEFLEET_TESTBED_OUTER_PID"

# Paths as a machine sees them.
SSHD_DIR = "/etc/ssh/testbed"
SSHD_CONFIG = f"{SSHD_DIR}/sshd_config"
BOOT_ID_FILE = "/run/boot-id"
BOOTLOADER_DEFAULT = "/var/lib/fake-bootloader/default"
# Where Debian puts Nix's programs, and where a Nix installer on macOS leaves them (on no
# login's PATH): a darwin machine has them only there.
NIX_BIN = "/usr/bin"
NIX_LIBEXEC = "/usr/libexec/nix"  # build-remote: a link to /usr/bin/nix
NIX_PROFILE_BIN = "/nix/var/nix/profiles/default/bin"
# A systemd machine's units see only this PATH, as NixOS's see only systemd's own bin directory
# (nixpkgs#261691): systemd's programs are there, coreutils (mv, ln, sleep) are not.
SYSTEMD_BIN = "/usr/lib/testbed/systemd/bin"

# cgroup hierarchies: the cgroup2 one (alone on a pure cgroup2 computer, beside v1 controllers
# on a hybrid one) and, on a hybrid computer, systemd's own v1 ``name=systemd`` tree.
CGROUP_ROOTS = ("/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd", "/sys/fs/cgroup")

# The state directory ends up in mount options, ssh_config and overlay paths: keep it plain.
_PLAIN_PATH = re.compile(r"[A-Za-z0-9._/+@-]+")
# Directories a machine replaces; a state directory inside them would hide itself or overlap.
_FORBIDDEN_STATE_PARENTS = ("/etc", "/var", "/nix", "/run", "/proc", "/sys", "/dev")


class TestbedError(Exception):
    """A failure with a message the user can act on (printed as one line)."""


def state_dir() -> Path:
    """The state directory: ``$FLAKEFLEET_TESTBED_STATE`` or ``<repo>/.testbed``."""
    path = Path(os.environ.get(STATE_ENV) or REPO_ROOT / ".testbed").absolute()
    check_state_dir(path)
    return path


def check_state_dir(path: Path) -> None:
    """Refuse state directories that a machine could not use safely."""
    text = str(path)
    if not _PLAIN_PATH.fullmatch(text):
        raise TestbedError(f"state directory {text!r} may only contain A-Z a-z 0-9 . _ / + @ -")
    for parent in _FORBIDDEN_STATE_PARENTS:
        if text == parent or text.startswith(parent + "/"):
            raise TestbedError(f"state directory {text} must not be under {parent}")
    if text == "/":
        raise TestbedError("state directory must not be /")


def cache_dir() -> Path:
    """The template cache: ``$FLAKEFLEET_TESTBED_CACHE`` or ``/var/cache/flakefleet``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).absolute()


def cgroup_hierarchies() -> list[Path]:
    """The mounted cgroup hierarchies a systemd machine's launcher must have its own
    directory in: the cgroup2 one and, on a hybrid computer, ``name=systemd``."""
    hierarchies = []
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    types = {fields[1]: (fields[2], fields[3]) for fields in (line.split() for line in mounts)}
    for root in CGROUP_ROOTS:
        fstype, options = types.get(root, ("", ""))
        if fstype == "cgroup2" or (fstype == "cgroup" and "name=systemd" in options.split(",")):
            hierarchies.append(Path(root))
    return hierarchies


def base_port() -> int:
    """The base SSH port: machine ``i`` (0-based) listens on ``base + 1 + i``."""
    raw = os.environ.get(PORT_ENV) or str(DEFAULT_BASE_PORT)
    if not raw.isdigit() or not 1024 <= int(raw) <= 65000:
        raise TestbedError(f"{PORT_ENV}={raw!r} is not a port number between 1024 and 65000")
    return int(raw)


@dataclass(frozen=True)
class StatePaths:
    """Files shared by the whole fleet, under the state directory."""

    root: Path

    @property
    def marker(self) -> Path:
        """Proves the directory is a testbed state directory (``down --purge`` checks it)."""
        return self.root / ".testbed-state"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def client_key(self) -> Path:
        return self.keys / "id_ed25519"

    @property
    def machine_key(self) -> Path:
        """The key every machine's root logs in to the others with (builders, caches)."""
        return self.keys / "machine_ed25519"

    @property
    def signing_key(self) -> Path:
        """The fleet's Nix signing key (secret); every machine trusts its public half."""
        return self.keys / "nix-signing.sec"

    @property
    def sudo_password(self) -> Path:
        """The password of every machine's ``deploy`` user, for the machines whose sudo asks
        for it (``sudoPassword`` in the roster); the fleet file reads it with ``cat``."""
        return self.keys / "sudo-password"

    @property
    def known_hosts(self) -> Path:
        return self.root / "known_hosts"

    @property
    def ssh_config(self) -> Path:
        return self.root / "ssh_config"

    @property
    def fleet_file(self) -> Path:
        return self.root / "fleet.yaml"

    @property
    def record(self) -> Path:
        """The machines the last ``up`` brought up, with their ports (JSON)."""
        return self.root / "machines.json"

    @property
    def machines(self) -> Path:
        return self.root / "machines"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    def machine(self, name: str) -> MachinePaths:
        return MachinePaths(self.machines / name)

    def cgroup(self, name: str) -> str:
        """A systemd machine's cgroup directory, relative to each hierarchy: one per machine
        and state directory, so two fleets with a web1 never share one."""
        digest = hashlib.sha256(str(self.root).encode()).hexdigest()[:12]
        return f"flakefleet-testbed/{digest}/{name}"


@dataclass(frozen=True)
class MachinePaths:
    """One machine's directory: its store, overlay layers, empty /root and process files."""

    root: Path

    @property
    def nix(self) -> Path:
        return self.root / "nix"

    @property
    def deploy_password_hash(self) -> Path:
        """When present, the crypt hash the machine gives its ``deploy`` user at boot."""
        return self.root / "deploy-password-hash"

    @property
    def nix_size(self) -> Path:
        """When present, the size of the tmpfs the machine gets as /nix instead of its store
        directory (a small disk, for disk-full tests; emptied when the machine stops)."""
        return self.root / "nix-size"

    @property
    def nix_off_path(self) -> Path:
        """When present, the machine keeps Nix's programs in its default profile only, as
        macOS does, and no login's PATH finds them (the darwin class)."""
        return self.root / "nix-off-path"

    @property
    def profile_nix(self) -> Path:
        """Where ``/usr/bin/nix`` is bound in the store of a machine with Nix off the PATH."""
        return self.nix / NIX_PROFILE_BIN.removeprefix("/nix/") / "nix"

    @property
    def usr_bin_upper(self) -> Path:
        """The upper layer of ``/usr/bin`` on a machine with Nix off the PATH."""
        return self.root / "usr-bin.upper"

    @property
    def usr_bin_work(self) -> Path:
        return self.root / "usr-bin.work"

    @property
    def nix_libexec_upper(self) -> Path:
        """The upper layer of Nix's libexec directory on a machine with Nix off the PATH."""
        return self.root / "nix-libexec.upper"

    @property
    def nix_libexec_work(self) -> Path:
        return self.root / "nix-libexec.work"

    @property
    def etc_upper(self) -> Path:
        return self.root / "etc.upper"

    @property
    def etc_work(self) -> Path:
        return self.root / "etc.work"

    @property
    def var_upper(self) -> Path:
        return self.root / "var.upper"

    @property
    def var_work(self) -> Path:
        return self.root / "var.work"

    @property
    def home(self) -> Path:
        """Bound on the machine's ``/root``: empty, so no dotfile of this computer runs there."""
        return self.root / "root"

    @property
    def kind(self) -> Path:
        """``namespace`` or ``systemd``: what the machine's directory was laid out for."""
        return self.root / "kind"

    @property
    def rootfs(self) -> Path:
        """A systemd machine's root, mounted only inside its launcher's mount namespace."""
        return self.root / "rootfs"

    @property
    def rootfs_upper(self) -> Path:
        """The upper layer of a systemd machine's root (its own /etc, /var, ...)."""
        return self.root / "rootfs.upper"

    @property
    def rootfs_work(self) -> Path:
        return self.root / "rootfs.work"

    @property
    def template(self) -> Path:
        """The template directory a systemd machine's upper layer lies on (its lower layer)."""
        return self.root / "template"

    def in_rootfs(self, path: str) -> Path:
        """Where a systemd machine's ``/...`` file lives in its upper layer."""
        return self.rootfs_upper / Path(path).relative_to("/")

    @property
    def pid_file(self) -> Path:
        """The PID of the machine's ``unshare`` process (a systemd machine's launcher), as
        seen from outside."""
        return self.root / "pid"

    @property
    def console_log(self) -> Path:
        return self.root / "console.log"

    @property
    def relay_pid(self) -> Path:
        """The PID of the machine's relay (``testbed.relay``), when it has one."""
        return self.root / "relay.pid"

    @property
    def relay_bytes(self) -> Path:
        """``SENT RECEIVED OPEN``: what the machine's relay passed so far (see testbed.relay)."""
        return self.root / "relay-bytes"

    @property
    def relay_log(self) -> Path:
        return self.root / "relay.log"

    def relayed_bytes(self) -> tuple[int, int, int]:
        """Bytes the machine's relay passed to it and back, and connections open now
        (zeros without a relay)."""
        try:
            sent, received, open_ = self.relay_bytes.read_text().split()
        except (FileNotFoundError, ValueError):
            return 0, 0, 0
        return int(sent), int(received), int(open_)

    def ssh_sessions(self) -> int:
        """How many SSH sessions the machine's sshd has started so far: its console log has a
        line for each (a namespace machine's sshd writes there, a systemd machine's journal is
        forwarded there)."""
        if not self.console_log.exists():
            return 0
        return self.console_log.read_text(errors="replace").count("Starting session")

    def ssh_logins(self) -> int:
        """How many SSH logins (connections, each with one or more sessions) its sshd has
        accepted so far."""
        if not self.console_log.exists():
            return 0
        return self.console_log.read_text(errors="replace").count("Accepted publickey")

    def in_etc(self, path: str) -> Path:
        """Where a machine's ``/etc/...`` file lives in its upper layer."""
        return self.etc_upper / Path(path).relative_to("/etc")
