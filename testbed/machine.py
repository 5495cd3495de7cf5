"""PID 1 of one test machine: mount its private filesystems, boot its system, keep sshd up.

Started by ``testbed.fleet`` as ``unshare --mount --uts --ipc --pid --fork ... python -m
testbed.machine <name> <state dir>``. In order, it

1. refuses to run unless it is PID 1 of a PID namespace with private mount propagation;
2. mounts ``/nix`` (bind of the machine's store), ``/etc`` and ``/var`` (overlays on the real
   directories), ``/root`` (bind of an empty directory), ``/run`` and ``/tmp`` (fresh tmpfs),
   makes every other mount it shares with this computer read-only (inside it only),
   then checks ``/proc/self/mountinfo`` and stops **before writing anything** unless every
   one of them is the machine's own: this computer's /etc, /var, /root and /nix are never written;
   a darwin machine also gets a layer over ``/usr/bin`` that keeps Nix in its default profile
   only, off every PATH, as on macOS;
3. sets the hostname and writes a fresh boot id to ``/run/boot-id`` (the kernel's boot_id is
   shared by all machines);
4. creates the ``deploy`` user on first boot and starts ``nix-daemon``;
5. boots the system selected by ``/var/lib/fake-bootloader/default``, if any: links
   ``/run/booted-system`` and ``/run/current-system`` and runs its ``activate``
   (output in ``/var/log/boot.log``);
6. becomes a tiny init: reaps orphans, restarts sshd one second after it exits, and on
   SIGTERM stops sshd and exits 0 (the kernel then ends every process of the machine).

The machine's /etc files (hostname, hosts, nix.conf, sshd configuration) are written from
outside, into the upper layer, before it starts.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import socket
import sys
import time
import uuid
from pathlib import Path

# Everything is imported above: after the mounts, this interpreter's own files may be hidden.
from testbed.layout import (
    BOOT_ID_FILE,
    BOOTLOADER_DEFAULT,
    NIX_BIN,
    NIX_LIBEXEC,
    NIX_PROFILE_BIN,
    SSHD_CONFIG,
    MachinePaths,
    StatePaths,
)

ENVIRONMENT = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
}
SSHD = ["/usr/sbin/sshd", "-D", "-e", "-f", SSHD_CONFIG]
CREATE_DEPLOY_USER = [
    "/usr/sbin/useradd",
    "--create-home",
    "--home-dir",
    "/var/lib/deploy",
    "--shell",
    "/bin/sh",
    "--password",
    "*",  # not locked ("!"): sshd with UsePAM no refuses locked accounts
    "deploy",
]
ACTIVATION_TIMEOUT = 60.0
SSHD_RESTART_DELAY = 1.0
SSHD_STOP_TIMEOUT = 2.0
# Blocked for the whole life of PID 1 and taken with sigtimedwait: a signal from outside is
# then never dropped (PID 1 of a namespace ignores signals it has no handler for).
# SIGUSR1 asks for a reboot from inside the machine (`kill -USR1 1`, the fleet file's
# reboot_command): every process dies, /run and /tmp start empty, and the system boots again.
INIT_SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1}
KERNEL_BOOT_ID = "/proc/sys/kernel/random/boot_id"
KERNEL_RANDOM = "/proc/sys/kernel/random"  # hidden on a darwin machine: a Mac has no boot id
MAC_BOOT_TIME = "/run/testbed-boottime"
DARWIN_PROFILE = "/nix/var/nix/profiles/system"
MAC_SYSCTL = "/run/testbed-sysctl"
# A Mac's `sysctl` for what flakefleet asks of it (`-n kern.boottime`, as macOS prints it).
MAC_SYSCTL_SCRIPT = f"""#!/bin/sh
case "$*" in
  "-n kern.boottime") cat {MAC_BOOT_TIME} ;;
  "kern.boottime") printf 'kern.boottime: '; cat {MAC_BOOT_TIME} ;;
  *) echo "sysctl: unknown oid '$*'" >&2; exit 1 ;;
esac
"""
MNT_DETACH = 2

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
# Per-mount flags a read-only remount must keep (a bind remount sets them all at once).
KEPT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC}
# Kernel filesystems stay as they are: devices, /proc and /sys are not files of this computer.
KERNEL_MOUNTS = ("/proc", "/sys", "/dev")
_libc = ctypes.CDLL(None, use_errno=True)


def umount(target: str) -> None:
    if _libc.umount2(target.encode(), MNT_DETACH) != 0:
        error = ctypes.get_errno()
        raise MachineError(f"umount {target} failed: {os.strerror(error)}")


class MachineError(Exception):
    """The machine cannot start; PID 1 exits 1 with this message."""


def log(message: str) -> None:
    print(f"init: {message}", file=sys.stderr, flush=True)


# -- processes ---------------------------------------------------------------------------------


def spawn(argv: list[str], *, output: str | None = None, new_session: bool = False) -> int:
    """Start ``argv`` with a clean environment and signal mask; return its PID.

    stdin is /dev/null; stdout and stderr go to ``output`` (appended) or stay on the console.
    """
    actions: list[tuple] = [(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0)]
    if output is not None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        actions += [(os.POSIX_SPAWN_OPEN, 1, output, flags, 0o644), (os.POSIX_SPAWN_DUP2, 1, 2)]
    return os.posix_spawn(
        argv[0],
        argv,
        ENVIRONMENT,
        file_actions=actions,
        setsid=new_session,
        setsigmask=(),
        # Python ignores these; a child must start with the defaults.
        setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
    )


def run(argv: list[str], *, output: str | None = None, timeout: float = 30.0) -> int | None:
    """Run ``argv`` to completion in its own session; its exit code, or None on timeout."""
    pid = spawn(argv, output=output, new_session=True)
    pidfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    if not ready:
        os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return None
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


# -- mounts ------------------------------------------------------------------------------------


def mount(source: str, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    result = _libc.mount(
        source.encode(), target.encode(), fstype.encode() if fstype else None, flags, data.encode()
    )
    if result != 0:
        error = ctypes.get_errno()
        raise MachineError(f"mount {source} on {target} failed: {os.strerror(error)}")


def read_mountinfo() -> dict[str, tuple[str, list[str]]]:
    """The topmost mount at each mount point: ``{mount point: (fstype, super options)}``."""
    mounts = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        before, after = line.split(" - ", 1)
        mount_point = before.split()[4]
        fstype, _source, super_options = after.split()[:3]
        mounts[mount_point] = (fstype, super_options.split(","))
    return mounts


def check_private_propagation() -> None:
    """A mount here must never reach this computer's own mount namespace."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        optional_fields = line.split(" - ", 1)[0].split()[6:]
        if any(field.startswith("shared:") for field in optional_fields):
            raise MachineError(
                "mount propagation is not private (start with --propagation private)"
            )


def identity(path: str | Path) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_dev, info.st_ino


def mount_filesystems(machine: MachinePaths, *, nix_off_path: bool = False) -> None:
    """Give the machine its own /nix, /etc, /var, /root, /run and /tmp, then verify them.

    With `nix_off_path` (a darwin machine), ``/usr/bin/nix`` is also bound on the file
    prepared for it in the default profile, ``/usr/bin`` gets the machine's layer, which
    deletes Nix's programs, and Nix's libexec directory one that finds them in the profile
    (see ``testbed.files``).
    """
    check_private_propagation()
    small_nix = machine.nix_size.read_text().strip() if machine.nix_size.exists() else None
    binds = {"/root": machine.home} if small_nix else {"/nix": machine.nix, "/root": machine.home}
    expected = {target: identity(source) for target, source in binds.items()}
    layers = {
        "/etc": (machine.etc_upper, machine.etc_work),
        "/var": (machine.var_upper, machine.var_work),
    }
    if nix_off_path:
        expected[f"{NIX_PROFILE_BIN}/nix"] = identity(f"{NIX_BIN}/nix")
        layers[NIX_BIN] = (machine.usr_bin_upper, machine.usr_bin_work)
        layers[NIX_LIBEXEC] = (machine.nix_libexec_upper, machine.nix_libexec_work)

    # Order matters: the state directory may be under /root or /tmp, which are covered last,
    # and /usr/bin/nix is bound before the layer over /usr/bin hides it.
    if small_nix:
        mount("tmpfs", "/nix", "tmpfs", MS_NOSUID | MS_NODEV, f"size={small_nix},mode=755")
    else:
        mount(str(machine.nix), "/nix", None, MS_BIND)
    if nix_off_path:
        mount(f"{NIX_BIN}/nix", f"{NIX_PROFILE_BIN}/nix", None, MS_BIND)
    for target, (upper, work) in layers.items():
        options = f"lowerdir={target},upperdir={upper},workdir={work}"
        mount("overlay", target, "overlay", 0, options)
    mount(str(machine.home), "/root", None, MS_BIND)
    mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=755")
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")

    mounts = read_mountinfo()
    for target, (upper, _work) in layers.items():
        fstype, options = mounts.get(target, ("", []))
        if fstype != "overlay" or f"upperdir={upper}" not in options:
            raise MachineError(f"{target} is not the machine's overlay ({fstype} {options})")
    for target, source_identity in expected.items():
        if target not in mounts or identity(target) != source_identity:
            raise MachineError(f"{target} is not the machine's bind mount")
    for target in ("/run", "/tmp", *(["/nix"] if small_nix else [])):
        if mounts.get(target, ("",))[0] != "tmpfs":
            raise MachineError(f"{target} is not a fresh tmpfs")
    seal_shared_mounts(["/nix", "/root", "/run", "/tmp", *layers])


def seal_shared_mounts(private: list[str]) -> None:
    """Make every mount the machine shares with this computer (/, /usr, /opt, /home, ...)
    read-only inside the machine, so nothing it runs can write this computer's files; its
    own mounts stay writable. Only this namespace's copies change."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" - ", 1)[0].split()
        target, options = fields[4], fields[5].split(",")
        if "ro" in options or any(
            target == top or target.startswith(top.rstrip("/") + "/")
            for top in (*private, *KERNEL_MOUNTS)
        ):
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        flags |= sum(flag for name, flag in KEPT_FLAGS.items() if name in options)
        mount("none", target, None, flags)


# -- boot --------------------------------------------------------------------------------------


def set_identity(name: str, mac: bool = False) -> str:
    """Hostname, a fresh boot id and the directories sshd needs; returns the boot id.

    A Mac (`mac`) has no boot id: its boot identity is its boot time, `sysctl -n
    kern.boottime`. Its /proc/sys/kernel/random is hidden, and its `sysctl` answers
    kern.boottime from this boot's time, in macOS's words.
    """
    socket.sethostname(name)
    boot_id = str(uuid.uuid4())
    Path(BOOT_ID_FILE).write_text(boot_id + "\n")
    if mac:
        mount("tmpfs", KERNEL_RANDOM, "tmpfs", MS_NOSUID | MS_NODEV, "mode=555")
        now = time.time()
        boot_time = f"{{ sec = {int(now)}, usec = {int(now % 1 * 1e6)} }} {time.ctime(now)}"
        Path(MAC_BOOT_TIME).write_text(boot_time + "\n")
        Path(MAC_SYSCTL).write_text(MAC_SYSCTL_SCRIPT)
        os.chmod(MAC_SYSCTL, 0o755)
        mount(MAC_SYSCTL, "/usr/sbin/sysctl", None, MS_BIND)
    else:
        # The kernel's boot id is shared by every machine: show this machine's own in its
        # place, so tools read boot ids where they always do.
        mount(BOOT_ID_FILE, KERNEL_BOOT_ID, None, MS_BIND)
    for directory, mode in (("/run/sshd", 0o755), ("/run/lock", 0o1777)):
        os.mkdir(directory)
        os.chmod(directory, mode)
    return boot_id


def ensure_deploy_user(password_hash: str | None) -> None:
    """A non-root login (home /var/lib/deploy), created once; it lives in the /etc overlay.

    With `password_hash`, it gets that password (its sudo asks for it, see testbed.files).
    """
    if not any(line.startswith("deploy:") for line in Path("/etc/passwd").read_text().splitlines()):
        code = run(CREATE_DEPLOY_USER, output="/var/log/boot.log")
        if code != 0:
            log(f"useradd deploy failed ({code}); see /var/log/boot.log")
    if password_hash:
        code = run(["/usr/sbin/usermod", "--password", password_hash, "deploy"])
        if code != 0:
            log(f"usermod deploy failed ({code})")


def name_root_group_wheel() -> None:
    """On a darwin machine, group 0 is `wheel`, as on macOS (there is no group `root`)."""
    if any(line.startswith("root:") for line in Path("/etc/group").read_text().splitlines()):
        code = run(["/usr/sbin/groupmod", "--new-name", "wheel", "root"])
        if code != 0:
            log(f"groupmod root -> wheel failed ({code})")


def boot_system() -> None:
    """Stage 2: activate the system the bootloader selected, if there is one. A Mac has no
    bootloader entry: nix-darwin's activate-system daemon links what its profile selects."""
    if os.path.ismount(KERNEL_RANDOM):  # a darwin machine (see set_identity)
        link_darwin_system()
        return
    selected = Path(BOOTLOADER_DEFAULT)
    if not selected.is_symlink() and not selected.exists():
        log("no system selected by the bootloader yet")
        return
    toplevel = selected.resolve()
    if not (toplevel / "activate").exists():
        log(f"selected system {toplevel} has no activate script; not booting it")
        return
    for link in ("/run/booted-system", "/run/current-system"):
        os.symlink(toplevel, link)
    log(f"activating {toplevel}")
    with open("/var/log/boot.log", "a") as boot_log:
        boot_log.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} activating {toplevel}\n")
    code = run([str(toplevel / "activate")], output="/var/log/boot.log", timeout=ACTIVATION_TIMEOUT)
    if code != 0:
        log(f"activation of {toplevel} failed ({code}); see /var/log/boot.log")


# -- init --------------------------------------------------------------------------------------


def stop(sshd: int | None) -> None:
    if sshd is None:
        return
    os.kill(sshd, signal.SIGTERM)
    deadline = time.monotonic() + SSHD_STOP_TIMEOUT
    while time.monotonic() < deadline:
        if os.waitpid(sshd, os.WNOHANG)[0] == sshd:
            return
        time.sleep(0.01)


def link_darwin_system() -> None:
    """As nix-darwin's activate-system launchd daemon does at every boot (RunAtLoad, in
    modules/services/activate-system): /run/current-system becomes the profile's systemConfig
    (macOS empties /run at boot). Its checks and /etc links are the system's own business."""
    config = Path(DARWIN_PROFILE) / "systemConfig"
    if not config.exists():
        log("no nix-darwin system in the profile yet")
        return
    os.symlink(config.read_text().strip(), "/run/current-system")
    log(f"linked /run/current-system to {config.read_text().strip()}")


def start_services(nix_bin: str) -> int:
    """What a boot starts after the mounts: nix-daemon, the selected system, then sshd."""
    spawn([f"{nix_bin}/nix-daemon"], output="/var/log/nix-daemon.log", new_session=True)
    boot_system()
    return spawn(SSHD)


def reboot_in_place(name: str, nix_bin: str, sshd: int | None) -> int:
    """Reboot without leaving the namespaces: kill every other process, give the machine an
    empty /run and /tmp and a new boot id, and boot the selected system again."""
    log("rebooting")
    stop(sshd)
    os.kill(-1, signal.SIGKILL)  # in a PID namespace: every process but this one
    while True:
        try:
            os.wait()
        except ChildProcessError:
            break
    mac = os.path.ismount(KERNEL_RANDOM)
    for target in (KERNEL_RANDOM if mac else KERNEL_BOOT_ID, *(["/usr/sbin/sysctl"] if mac else []),
                   "/run", "/tmp"):  # fmt: skip
        umount(target)
    mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=755")
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    log(f"{name} booting, boot id {set_identity(name, mac)}")
    return start_services(nix_bin)


def supervise(name: str, nix_bin: str, sshd: int | None) -> int:
    """Keep sshd running and reap orphans until SIGTERM; then stop sshd and return 0."""
    restart_at: float | None = None
    while True:
        if restart_at is None:
            info = signal.sigwaitinfo(INIT_SIGNALS)
        else:
            info = signal.sigtimedwait(INIT_SIGNALS, max(0.0, restart_at - time.monotonic()))
        if info is None:  # the restart delay is over
            sshd, restart_at = spawn(SSHD), None
            continue
        if info.si_signo in (signal.SIGTERM, signal.SIGINT):
            log("stopping")
            stop(sshd)
            return 0
        if info.si_signo == signal.SIGUSR1:
            sshd, restart_at = reboot_in_place(name, nix_bin, sshd), None
            continue
        while True:  # SIGCHLD: reap every exited child, adopted orphans included
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid == sshd:
                code = os.waitstatus_to_exitcode(status)
                log(f"sshd (pid {pid}) exited rc={code}; restarting in {SSHD_RESTART_DELAY:g}s")
                sshd, restart_at = None, time.monotonic() + SSHD_RESTART_DELAY


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m testbed.machine <name> <state dir>", file=sys.stderr)
        return 1
    name, state = argv
    if os.getpid() != 1:
        print("testbed.machine: refusing to run: not PID 1 of a PID namespace", file=sys.stderr)
        return 1
    signal.pthread_sigmask(signal.SIG_BLOCK, INIT_SIGNALS)
    paths = StatePaths(Path(state)).machine(name)
    hash_file = paths.deploy_password_hash
    password_hash = hash_file.read_text().strip() if hash_file.exists() else None
    nix_off_path = paths.nix_off_path.exists()  # a darwin machine: Nix in its profile only
    nix_bin = NIX_PROFILE_BIN if nix_off_path else NIX_BIN
    try:
        mount_filesystems(paths, nix_off_path=nix_off_path)
    except (MachineError, OSError) as error:
        print(f"testbed.machine: refusing to boot {name}: {error}", file=sys.stderr)
        return 1
    boot_id = set_identity(name, mac=nix_off_path)
    log(f"{name} booting, boot id {boot_id}")
    ensure_deploy_user(password_hash)
    if nix_off_path:
        name_root_group_wheel()
    return supervise(name, nix_bin, start_services(nix_bin))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
