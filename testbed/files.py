"""Files the test fleet writes before machines start: keys, each machine's /etc, client files.

A machine's own files are written from outside into the upper layer of its ``/etc`` overlay
(a systemd machine's: of its root), so nothing inside a machine has to write ``/etc`` before
its mounts are verified, and nothing is written there while the machine runs. The client
files (``ssh_config``, ``known_hosts``, ``fleet.yaml``) are what the deployer and tests use.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import stat
import subprocess
import uuid
from pathlib import Path

from testbed.layout import (
    BOOTLOADER_DEFAULT,
    NIX_BIN,
    NIX_LIBEXEC,
    NIX_PROFILE_BIN,
    SSHD_CONFIG,
    SSHD_DIR,
    MachinePaths,
    StatePaths,
    TestbedError,
)
from testbed.roster import Machine

HOST_KEY = f"{SSHD_DIR}/ssh_host_ed25519_key"
AUTHORIZED_KEYS = f"{SSHD_DIR}/authorized_keys"

SUDOERS = "/etc/sudoers.d/deploy"
# A systemd machine's sshd is Debian's ssh.service, set up from a drop-in as NixOS sets it up.
SYSTEMD_HOST_KEY = "/etc/ssh/ssh_host_ed25519_key"
SYSTEMD_SSHD_CONFIG = "/etc/ssh/sshd_config.d/testbed.conf"
SYSTEMD_AUTHORIZED_KEYS = "/etc/ssh/authorized_keys.d"


def nix_conf(trusted_key: str) -> str:
    """The machine's nix.conf: offline, builds as root, closures signed by the fleet's key."""
    return f"""\
# Written by the testbed: an offline machine; builds run as root.
experimental-features = nix-command flakes
sandbox = false
substituters =
build-users-group =
warn-dirty = false
trusted-users = root deploy
trusted-public-keys = {trusted_key}
"""


def _sshd_settings(port: int, host_key: str, authorized_keys: str) -> str:
    """What every test machine's sshd has: its own port on loopback, keys only, no DNS."""
    return f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
PermitRootLogin prohibit-password
AuthorizedKeysFile {authorized_keys}
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
MaxStartups 100:30:200
# VERBOSE logs every session and command to the console log (bench/ counts them).
LogLevel VERBOSE
"""


def sshd_config(port: int) -> str:
    """The machine's sshd configuration (``/etc/ssh/testbed/sshd_config``)."""
    return (
        "# Written by the testbed at each start of the machine.\n"
        + _sshd_settings(port, HOST_KEY, AUTHORIZED_KEYS)
        + "UsePAM no\nPidFile /run/sshd.pid\nSubsystem sftp /usr/lib/openssh/sftp-server\n"
    )


def systemd_sshd_config(port: int) -> str:
    """A systemd machine's sshd settings (``/etc/ssh/sshd_config.d/testbed.conf``)."""
    return (
        "# Written by the testbed at each start of the machine; read before Debian's\n"
        "# sshd_config (whose UsePAM yes gives each login a logind session, as on NixOS).\n"
        "# AuthorizedKeysFile as on NixOS, where users.users.<name>.openssh.authorizedKeys\n"
        "# end up.\n"
        + _sshd_settings(
            port, SYSTEMD_HOST_KEY, f".ssh/authorized_keys {SYSTEMD_AUTHORIZED_KEYS}/%u"
        )
    )


def write_file(path: Path, text: str, mode: int = 0o644) -> None:
    """Replace ``path`` atomically (this also replaces an overlay whiteout left there)."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    temporary.chmod(mode)
    temporary.replace(path)


def generate_key(path: Path, comment: str) -> None:
    """Create an ed25519 key pair at ``path`` unless it exists (keys are kept until purge)."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (path, path.with_name(path.name + ".pub")):
        stale.unlink(missing_ok=True)
    result = subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise TestbedError(f"ssh-keygen failed for {path}: {result.stderr.strip()}")


def generate_sudo_password(path: Path) -> None:
    """A random password for the machines' ``deploy`` user, unless one exists (kept)."""
    if not path.exists():
        write_file(path, secrets.token_urlsafe(18) + "\n", 0o600)


def password_hash(password_line: str) -> str:
    """The SHA-512 crypt hash of a password (for /etc/shadow), made by openssl."""
    completed = subprocess.run(
        ["openssl", "passwd", "-6", "-stdin"],
        input=password_line, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if completed.returncode != 0:
        raise TestbedError(f"openssl passwd failed: {completed.stderr.strip()}")
    return completed.stdout.strip() + "\n"


def generate_signing_key(path: Path, name: str) -> None:
    """A Nix signing key pair at ``<path>`` and ``<path>.pub``, unless it exists (kept)."""
    if path.exists() and path.with_name(path.name + ".pub").exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    nix = ["nix", "--extra-experimental-features", "nix-command"]
    secret = subprocess.run(
        [*nix, "key", "generate-secret", "--key-name", name],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if secret.returncode != 0:
        raise TestbedError(f"nix key generate-secret failed: {secret.stderr.strip()}")
    public = subprocess.run(
        [*nix, "key", "convert-secret-to-public"],
        input=secret.stdout, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if public.returncode != 0:
        raise TestbedError(f"nix key convert-secret-to-public failed: {public.stderr.strip()}")
    write_file(path, secret.stdout, 0o600)
    write_file(path.with_name(path.name + ".pub"), public.stdout.strip() + "\n")


def signing_public_key(state: StatePaths) -> str:
    """``name:base64`` of the fleet's Nix signing key."""
    return state.signing_key.with_name(state.signing_key.name + ".pub").read_text().strip()


def public_key(private_key: Path) -> str:
    """``ssh-ed25519 AAAA...`` of a key pair, without its comment."""
    key_type, blob = private_key.with_name(private_key.name + ".pub").read_text().split()[:2]
    return f"{key_type} {blob}"


def _make_upper_dirs(upper: Path, lower: Path, relative: Path) -> None:
    """Create ``upper/relative`` with the owner and mode of the real directory it shadows."""
    current_upper, current_lower = upper, lower
    for part in relative.parts:
        current_upper, current_lower = current_upper / part, current_lower / part
        if current_upper.is_dir():
            continue
        current_upper.mkdir()
        if current_lower.is_dir():
            info = current_lower.stat()
            os.chown(current_upper, info.st_uid, info.st_gid)
            current_upper.chmod(info.st_mode & 0o7777)
        else:
            current_upper.chmod(0o755)


def _init_layer(upper: Path, lower: Path) -> None:
    """An overlay's root takes its owner and mode from the upper directory: copy the real one."""
    upper.mkdir(parents=True, exist_ok=True)
    info = lower.stat()
    os.chown(upper, info.st_uid, info.st_gid)
    upper.chmod(info.st_mode & 0o7777)


def _merged_text(upper: Path, lower: Path) -> str:
    """What a machine sees at a path: its upper file if there is one, else the lower one."""
    if upper.is_file():
        return upper.read_text()
    if upper.exists() or upper.is_symlink():
        return ""  # deleted inside the machine (an overlay whiteout)
    try:
        return lower.read_text()
    except FileNotFoundError:
        return ""


def _hosts(current: str, machine: Machine) -> str:
    """``/etc/hosts`` with the machine's name on its own loopback address (sudo needs it
    resolvable too), and no other line for that name."""
    lines = [line for line in current.splitlines() if machine.name not in line.split()[1:]]
    return "\n".join([*lines, f"{machine.address}\t{machine.name}"]) + "\n"


def _authorized_keys(state: StatePaths) -> str:
    """The deployer's key and the machines' own (builders, caches), for every user."""
    return f"{public_key(state.client_key)}\n{public_key(state.machine_key)}\n"


def _sudoers(machine: Machine) -> str:
    """The deploy user may do anything as root: with its password (sudoPassword), or without
    one (sudo -n works)."""
    if machine.sudo_password:
        return "deploy ALL=(ALL:ALL) ALL\n"
    return "deploy ALL=(ALL:ALL) NOPASSWD: ALL\n"


def _lay_out(paths: MachinePaths, kind: str) -> None:
    """The machine's directory, for a namespace or a systemd machine. A machine that changes
    kind starts afresh: one Nix version's store and the other's layers do not mix."""
    previous = paths.kind.read_text().strip() if paths.kind.exists() else None
    if previous is None and paths.etc_upper.exists():
        previous = "namespace"  # laid out before machines had kinds
    if previous not in (None, kind):
        shutil.rmtree(paths.root)
    paths.root.mkdir(parents=True, exist_ok=True)
    write_file(paths.kind, kind + "\n")


def prepare_machine(state: StatePaths, machine: Machine, template: Path | None = None) -> None:
    """Lay out a stopped machine's directory and write its /etc files into the upper layer.

    Kept across starts: the store, /etc and /var changes, the host key, nix.conf and the
    deploy user. Rewritten at every start: the sshd configuration and authorized keys.
    A systemd machine needs the ``template`` its root lies on (``testbed.template.ensure``).
    """
    paths = state.machine(machine.name)
    _lay_out(paths, "systemd" if machine.systemd else "namespace")
    paths.nix.mkdir(exist_ok=True)
    paths.nix.chmod(0o755)
    paths.home.mkdir(exist_ok=True)
    paths.home.chmod(0o700)
    if machine.nix_size:
        paths.nix_size.write_text(machine.nix_size + "\n")
    else:
        paths.nix_size.unlink(missing_ok=True)
    if machine.systemd:
        if template is None:
            raise TestbedError(f"{machine.name} is a systemd machine: it needs a template")
        _prepare_systemd_machine(state, machine, template)
        return
    for directory in (paths.etc_work, paths.var_work):
        directory.mkdir(exist_ok=True)
    if machine.klass == "darwin":  # a non-interactive SSH session on macOS has no Nix on PATH
        _move_nix_off_path(paths)
    else:
        paths.nix_off_path.unlink(missing_ok=True)
    _init_layer(paths.etc_upper, Path("/etc"))
    _init_layer(paths.var_upper, Path("/var"))

    for etc_path in (SSHD_CONFIG, "/etc/nix/nix.conf"):
        _make_upper_dirs(paths.etc_upper, Path("/etc"), Path(etc_path).parent.relative_to("/etc"))
    generate_key(paths.in_etc(HOST_KEY), f"root@{machine.name}")
    write_file(paths.in_etc(SSHD_CONFIG), sshd_config(machine.port))
    write_file(paths.in_etc(AUTHORIZED_KEYS), _authorized_keys(state))  # one for every user
    _make_upper_dirs(paths.etc_upper, Path("/etc"), Path("sudoers.d"))
    write_file(paths.in_etc(SUDOERS), _sudoers(machine), 0o440)
    if machine.sudo_password:
        write_file(paths.deploy_password_hash, password_hash(state.sudo_password.read_text()))
    else:
        paths.deploy_password_hash.unlink(missing_ok=True)

    # Only NixOS machines say so; a darwin or home-manager machine is another system.
    if machine.klass == "nixos" and not paths.in_etc("/etc/NIXOS").is_file():
        write_file(paths.in_etc("/etc/NIXOS"), "")
    if not paths.in_etc("/etc/nix/nix.conf").is_file():
        write_file(paths.in_etc("/etc/nix/nix.conf"), nix_conf(signing_public_key(state)))
    write_file(paths.in_etc("/etc/hostname"), machine.name + "\n")
    hosts = _merged_text(paths.in_etc("/etc/hosts"), Path("/etc/hosts"))
    write_file(paths.in_etc("/etc/hosts"), _hosts(hosts, machine))


def _prepare_systemd_machine(state: StatePaths, machine: Machine, template: Path) -> None:
    """A systemd machine's own files, in the upper layer of its root: machine id, hostname,
    hosts, host key, sshd drop-in, authorized keys, sudo, nix.conf. Its /nix and /root are the
    same directories a namespace machine has."""
    paths = state.machine(machine.name)
    if paths.template.exists() and paths.template.read_text().strip() != str(template):
        # Its /etc and /var changes were made on another template: start them afresh; and
        # its store too if its Nix changes (an older Nix cannot read a newer one's database).
        previous = Path(paths.template.read_text().strip())
        stale = [paths.rootfs_upper, paths.rootfs_work]
        if previous.name.split("-")[0] != template.name.split("-")[0]:
            stale.append(paths.nix)
        for layer in stale:
            if layer.exists():
                shutil.rmtree(layer)
        paths.nix.mkdir(mode=0o755, exist_ok=True)
    write_file(paths.template, f"{template}\n")
    for directory in (paths.rootfs, paths.rootfs_work):
        directory.mkdir(exist_ok=True)
    _init_layer(paths.rootfs_upper, template)

    def put(path: str, text: str, mode: int = 0o644) -> None:
        relative = Path(path).relative_to("/")
        _make_upper_dirs(paths.rootfs_upper, template, relative.parent)
        write_file(paths.rootfs_upper / relative, text, mode)

    if not paths.in_rootfs("/etc/machine-id").is_file():
        put("/etc/machine-id", uuid.uuid4().hex + "\n", 0o444)
    put("/etc/hostname", machine.name + "\n")
    put("/etc/hosts", _hosts(_hosts_of(paths, template), machine))
    _make_upper_dirs(paths.rootfs_upper, template, Path("etc/ssh"))
    generate_key(paths.in_rootfs(SYSTEMD_HOST_KEY), f"root@{machine.name}")
    put(SYSTEMD_SSHD_CONFIG, systemd_sshd_config(machine.port))
    for user in ("root", "deploy"):
        put(f"{SYSTEMD_AUTHORIZED_KEYS}/{user}", _authorized_keys(state))
    put(SUDOERS, _sudoers(machine), 0o440)
    password = password_hash(state.sudo_password.read_text()) if machine.sudo_password else "*"
    _set_deploy_password(paths, template, password.strip())
    if machine.klass == "nixos" and not paths.in_rootfs("/etc/NIXOS").is_file():
        put("/etc/NIXOS", "")
    if machine.klass == "home" and machine.user != "root":
        # The user's own systemd manager runs from boot on, as on a machine where the user
        # has lingering on (home-manager's user units need it; logind starts user@UID).
        put(f"/var/lib/systemd/linger/{machine.user}", "")
    if not paths.in_rootfs("/etc/nix/nix.conf").is_file():
        put("/etc/nix/nix.conf", nix_conf(signing_public_key(state)))


def _hosts_of(paths: MachinePaths, template: Path) -> str:
    current = _merged_text(paths.in_rootfs("/etc/hosts"), template / "etc/hosts")
    return current or "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"


def _set_deploy_password(paths: MachinePaths, template: Path, password: str) -> None:
    """The deploy user's shadow entry on a systemd machine (``*``: no password, not locked)."""
    lower = template / "etc/shadow"
    upper = paths.in_rootfs("/etc/shadow")
    lines = _merged_text(upper, lower).splitlines()
    changed = [
        ":".join([fields[0], password, *fields[2:]]) if fields[0] == "deploy" else line
        for line, fields in ((line, line.split(":")) for line in lines)
    ]
    if changed == lines:
        return
    _make_upper_dirs(paths.rootfs_upper, template, Path("etc"))
    write_file(upper, "\n".join(changed) + "\n", 0o640)
    info = lower.stat()
    os.chown(upper, info.st_uid, info.st_gid)


# Programs a stock Mac does not have (util-linux's, coreutils' and systemd's): a darwin
# machine's /usr/bin layer deletes them too, so a deploy that relies on them fails there as it
# would on macOS.
NOT_ON_A_MAC = ("setsid", "flock", "timeout", "getent", "nproc", "systemd-run", "systemctl")


def _move_nix_off_path(paths: MachinePaths) -> None:
    """Nix only in the machine's default profile: its ``nix`` is a file the machine binds
    ``/usr/bin/nix`` on (Debian's other Nix programs are links to it, and so are the
    profile's), the layer the machine puts over ``/usr/bin`` deletes every ``nix*``, and the
    one over Nix's libexec directory points its build hook at the profile's ``nix``."""
    programs = sorted(path.name for path in Path(NIX_BIN).glob("nix*"))
    profile = paths.profile_nix.parent
    profile.mkdir(parents=True, exist_ok=True)
    for upper, work, lower in (
        (paths.usr_bin_upper, paths.usr_bin_work, NIX_BIN),
        (paths.nix_libexec_upper, paths.nix_libexec_work, NIX_LIBEXEC),
    ):
        _init_layer(upper, Path(lower))
        work.mkdir(exist_ok=True)
    build_hook = paths.nix_libexec_upper / "build-remote"
    if not build_hook.is_symlink():
        build_hook.symlink_to(f"{NIX_PROFILE_BIN}/nix")
    for name in programs:
        in_profile = profile / name
        if in_profile.is_symlink():  # from an older test fleet: links to /usr/bin
            in_profile.unlink()
        if name == "nix":
            in_profile.touch()
        elif not in_profile.is_symlink():
            in_profile.symlink_to("nix")
    for name in [*programs, *NOT_ON_A_MAC]:
        whiteout = paths.usr_bin_upper / name
        if not os.path.lexists(whiteout):  # an overlay shows a 0:0 character device as deleted
            os.mknod(whiteout, stat.S_IFCHR, os.makedev(0, 0))
    paths.nix_off_path.touch()


def host_public_key(state: StatePaths, machine: Machine) -> str:
    paths = state.machine(machine.name)
    if machine.systemd:
        return public_key(paths.in_rootfs(SYSTEMD_HOST_KEY))
    return public_key(paths.in_etc(HOST_KEY))


def render_known_hosts(machines: list[Machine], host_keys: dict[str, str]) -> str:
    """Every host key under both spellings: ``web1,[127.0.0.1]:22401 ssh-ed25519 AAAA...``,
    and under its relay's address too when it has one (pyinfra looks keys up by address)."""
    lines = []
    for machine in machines:
        names = [machine.name, f"[127.0.0.1]:{machine.port}"]
        if machine.ssh_address != "127.0.0.1":
            names.append(f"[{machine.ssh_address}]:{machine.port}")
        lines.append(f"{','.join(names)} {host_keys[machine.name]}\n")
    return "".join(lines)


def render_ssh_config(machines: list[Machine], state: StatePaths) -> str:
    """One ``Host`` block per machine, strict host key checking, no prompts."""
    blocks = [
        f"""\
Host {machine.name}
  HostName {machine.ssh_address}
  Port {machine.port}
  User root
  IdentityFile {state.client_key}
  IdentitiesOnly yes
  StrictHostKeyChecking yes
  BatchMode yes
  UserKnownHostsFile {state.known_hosts}
  LogLevel ERROR
"""
        for machine in machines
    ]
    return "# Written by `python -m testbed up`.\n\n" + "\n".join(blocks)


_YAML_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "y", "n"}


def _yaml_scalar(text: str) -> str:
    """``text`` as a YAML scalar: bare when that is unambiguous, else JSON-quoted."""
    if _YAML_PLAIN.fullmatch(text) and text.lower() not in _YAML_WORDS:
        return text
    return json.dumps(text)


def render_fleet_file(
    machines: list[Machine], signing_key: Path | None = None, sudo_password: Path | None = None
) -> str:
    """The test fleet as a flakefleet fleet file (paths relative to the file).

    With ``signing_key``, deploys sign closures with the key every machine trusts; with
    ``sudo_password``, they read the deploy user's sudo password from that file.
    """
    lines = [
        "# Written by `python -m testbed up`: the test fleet, as a flakefleet fleet file.",
        "ssh:",
        "  key: keys/id_ed25519",
        "  known_hosts: known_hosts",
        "data:",
        "  nix_options:",
        '    substituters: ""',
        "  # A test machine reboots when its PID 1 gets SIGUSR1 (see testbed/machine.py).",
        '  reboot_command: "kill -USR1 1"',
    ]
    if signing_key is not None:
        lines += [
            "  # Every machine trusts this key's public half.",
            f"  signing_key: {signing_key}",
        ]
    if sudo_password is not None and any(machine.sudo_password for machine in machines):
        lines += [
            "  # The deploy user's sudo password, on machines whose sudo asks for it.",
            f"  sudo_password_command: {_yaml_scalar(f'cat {shlex.quote(str(sudo_password))}')}",
        ]
    lines.append("machines:")
    for machine in machines:
        roles = ", ".join(_yaml_scalar(role) for role in machine.roles)
        lines += [
            f"  - name: {_yaml_scalar(machine.name)}",
            f"    address: {machine.ssh_address}",
            f"    port: {machine.port}",
            f"    user: {machine.user}",
            f"    class: {_yaml_scalar(machine.klass)}",
            f"    roles: [{roles}]",
        ]
        data = []
        if machine.service_port is not None:
            data += [f"service_address: {machine.address}", f"service_port: {machine.service_port}"]
        if machine.systemd:  # systemd reboots on its own terms, not on SIGUSR1
            data.append('reboot_command: "systemctl reboot"')
        if data:
            lines.append(f"    data: {{{', '.join(data)}}}")
    return "\n".join(lines) + "\n"


def write_client_files(state: StatePaths, machines: list[Machine]) -> None:
    """Write ``known_hosts``, ``ssh_config`` and ``fleet.yaml`` for ``machines``."""
    host_keys = {machine.name: host_public_key(state, machine) for machine in machines}
    known_hosts = render_known_hosts(machines, host_keys)
    write_file(state.known_hosts, known_hosts)
    write_file(state.ssh_config, render_ssh_config(machines, state))
    write_file(
        state.fleet_file, render_fleet_file(machines, state.signing_key, state.sudo_password)
    )
    for machine in machines:
        write_machine_ssh(state, machine, known_hosts)


def write_machine_ssh(state: StatePaths, machine: Machine, known_hosts: str) -> None:
    """Give the machine's root the fleet's machine key and every machine's host key, so a
    builder or cache machine can copy closures to the others (``ssh -p PORT 127.0.0.1``)."""
    ssh = state.machine(machine.name).home / ".ssh"
    ssh.mkdir(mode=0o700, exist_ok=True)
    write_file(ssh / "id_ed25519", state.machine_key.read_text(), 0o600)
    write_file(ssh / "known_hosts", known_hosts)


def boot_default_command(system: str, activate: str) -> str:
    """A shell command that lays out a minimal system at `system` (its `activate` script) and
    makes it what the imitation bootloader boots next (tests of the boot sequence)."""
    return (
        f"mkdir -p {system} {Path(BOOTLOADER_DEFAULT).parent}"
        f" && printf '%s' '{activate}' > {system}/activate && chmod +x {system}/activate"
        f" && ln -sfn {system} {BOOTLOADER_DEFAULT}"
    )
