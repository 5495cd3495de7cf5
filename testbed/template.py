"""The systemd machines' root file system: Debian trixie (Nix 2.26) or sid (Nix 2.34) with
systemd, sshd and python3 (the example's web services).

Built once with ``debootstrap`` from the Debian mirror this computer's apt already uses (its own
apt sources stay as they are), configured as every systemd machine shares it, trimmed, and kept
outside the repository in ``$FLAKEFLEET_TESTBED_CACHE`` (default ``/var/cache/flakefleet``) as
``<suite>-<recipe digest>/``, one per Debian suite a machine's ``nix`` asks for. Each machine
is an overlay on it (``testbed.nspawn``), so the directory is never written after it is built.
A changed recipe gives a new directory; a lock makes two test fleets that need it at once build
it once.

What every machine shares, beyond Debian's packages:

- an empty ``/etc/machine-id`` and no SSH host keys (each machine gets its own);
- NixOS's unit PATH: ``/etc/systemd/system.conf.d/path.conf`` sets ``DefaultEnvironment=PATH=``
  to a directory of systemd's own programs only (``SYSTEMD_BIN``), so a unit's script that
  relies on ``mv`` or ``ln`` fails as it does on NixOS (nixpkgs#261691);
- ``nix-daemon.socket`` enabled (Debian's nix-bin ships no units), for non-root users;
- a ``deploy`` user (home ``/var/lib/deploy``) whose account is not locked;
- NixOS's stage 2, imitated: at each boot, before sshd, ``testbed-boot-system.service``
  links ``/run/booted-system`` and ``/run/current-system`` to the system the imitation
  bootloader selected (``/var/lib/fake-bootloader/default``) and runs its ``activate``
  (output in ``/var/log/boot.log``), as a namespace machine's PID 1 does;
- Debian's timers and the units a container has no use for masked.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from testbed.layout import BOOTLOADER_DEFAULT, SYSTEMD_BIN, TestbedError, cache_dir

# The Debian suites a systemd machine's root comes from, by the Nix version their nix-bin has.
SUITES = ("trixie", "sid")
PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "libpam-systemd", "openssh-server", "nix-bin",
    # The example's role services are python3 -m http.server, as on the namespace machines.
    "python3",
    # debootstrap does not resolve nix-bin's virtual perl-dbdabi-94: name its provider.
    "libdbi-perl",
    "rsync", "sudo", "iproute2", "procps",
)  # fmt: skip
# Debian's periodic jobs, and what a container on a shared network has no use for; NixOS runs
# none of them either.
MASKED_UNITS = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "fstrim.timer",
    "console-getty.service",
    "sshd-keygen.service",
)
NIX_DAEMON_SOCKET = """\
[Unit]
Description=Nix Daemon Socket
Before=multi-user.target
RequiresMountsFor=/nix/store

[Socket]
ListenStream=/nix/var/nix/daemon-socket/socket

[Install]
WantedBy=sockets.target
"""
# NixOS gives nix-daemon its own PATH (Nix, ssh for remote builders); so does this unit.
NIX_DAEMON_SERVICE = """\
[Unit]
Description=Nix Daemon
Requires=nix-daemon.socket
RequiresMountsFor=/nix/store

[Service]
ExecStart=@/usr/bin/nix-daemon nix-daemon --daemon
Environment=PATH=/usr/bin:/usr/sbin
KillMode=process
LimitNOFILE=1048576
"""
PATH_CONF = f"[Manager]\nDefaultEnvironment=PATH={SYSTEMD_BIN}\n"
# The journal goes to the console too (the machine's console.log, as a namespace machine's
# sshd writes there): sshd's "Starting session" lines, which bench/ and tests count.
JOURNAL_TO_CONSOLE = "[Journal]\nForwardToConsole=yes\nTTYPath=/dev/console\nMaxLevelConsole=info\n"
BOOT_SYSTEM = "/usr/lib/testbed/boot-system"
# NixOS's stage 2 runs with its own PATH, and so does this script.
BOOT_SYSTEM_SCRIPT = f"""\
#!/bin/sh
# Stage 2 of the imitation NixOS boot: activate the system the bootloader selected.
PATH=/usr/sbin:/usr/bin
selected={BOOTLOADER_DEFAULT}
if [ ! -e "$selected" ]; then
  echo "no system selected by the bootloader yet"
  exit 0
fi
toplevel=$(readlink -f "$selected")
if [ ! -x "$toplevel/activate" ]; then
  echo "selected system $toplevel has no activate script; not booting it"
  exit 0
fi
ln -sfn "$toplevel" /run/booted-system
ln -sfn "$toplevel" /run/current-system
echo "activating $toplevel"
echo "== $(date '+%F %T') activating $toplevel" >>/var/log/boot.log
"$toplevel/activate" >>/var/log/boot.log 2>&1 || status=$?
# Then systemd starts what the system wants, with its units (as NixOS's stage 2 hands over to
# systemd, whose default target wants them); without waiting for them: they come after this.
systemctl daemon-reload
for unit in "$toplevel"/etc/systemd/system/multi-user.target.wants/*; do
  [ -e "$unit" ] && systemctl start --no-block "$(basename "$unit")"
done
exit ${{status:-0}}
"""
# The services its activation starts stay in this unit's cgroup (RemainAfterExit).
BOOT_SYSTEM_SERVICE = f"""\
[Unit]
Description=Activate the system the imitation bootloader selected (NixOS's stage 2)
After=local-fs.target nix-daemon.socket
Before=ssh.service multi-user.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart={BOOT_SYSTEM}
TimeoutStartSec=60

[Install]
WantedBy=multi-user.target
"""
# Removed after the build: what no machine reads (203 MB instead of about 400 MB).
TRIMMED = (
    "var/cache/apt/archives",
    "var/lib/apt/lists",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
)
# Bump when a step below changes in a way the recipe's data does not show.
RECIPE_VERSION = 2
BUILD_TIMEOUT = 900.0
MIRROR_ENV = "FLAKEFLEET_TESTBED_MIRROR"


def recipe(suite: str) -> dict[str, object]:
    """Everything the template's content depends on; its digest names the directory."""
    return {
        "version": RECIPE_VERSION,
        "suite": suite,
        "variant": "minbase",
        "packages": PACKAGES,
        "masked": MASKED_UNITS,
        "path": SYSTEMD_BIN,
        "units": [NIX_DAEMON_SOCKET, NIX_DAEMON_SERVICE, BOOT_SYSTEM_SERVICE, BOOT_SYSTEM_SCRIPT],
        "journal": JOURNAL_TO_CONSOLE,
        "trimmed": TRIMMED,
    }


def template_dir(suite: str, cache: Path | None = None) -> Path:
    """Where the template of the current recipe for ``suite`` lives (built or not)."""
    text = json.dumps(recipe(suite), sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return (cache or cache_dir()) / f"{suite}-{digest}"


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    """One build at a time on this computer, whichever test fleet asks for it."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ensure(suite: str) -> Path:
    """The template directory of ``suite``, built first if it is missing (about a minute)."""
    if suite not in SUITES:
        raise TestbedError(f"no systemd machine template for Debian {suite!r} ({SUITES})")
    final = template_dir(suite)
    if final.is_dir():
        return final
    with _locked(final.parent):
        if final.is_dir():  # built by another test fleet while this one waited
            return final
        for program in ("debootstrap", "systemd-nspawn"):
            if shutil.which(program) is None:
                raise TestbedError(f"{program} is not installed (run bin/setup)")
        mirror = debian_mirror()
        building = final.with_name(final.name + ".building")
        if building.exists():  # a build that was interrupted
            shutil.rmtree(building)
        log = final.with_name(final.name + ".log")
        print(
            f"testbed: building the systemd machines' root file system in {final}"
            f" (once; about a minute; log: {log})",
            file=sys.stderr,
            flush=True,
        )
        started = time.monotonic()
        _debootstrap(suite, building, mirror, final.parent / "debs", log)
        configure(building)
        trim(building)
        (building / "etc" / "testbed-template.json").write_text(
            json.dumps({**recipe(suite), "mirror": mirror}, indent=2) + "\n"
        )
        building.rename(final)
        print(
            f"testbed: built {final} in {time.monotonic() - started:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    return final


def debian_mirror(apt: Path = Path("/etc/apt")) -> str:
    """The Debian archive this computer's apt uses (``$FLAKEFLEET_TESTBED_MIRROR`` first).

    Example: ``http://deb.debian.org/debian`` from ``URIs:`` of a ``Suites: bookworm ...``
    stanza in ``/etc/apt/sources.list.d/debian.sources``.
    """
    if os.environ.get(MIRROR_ENV):
        return os.environ[MIRROR_ENV]
    sources = apt / "sources.list.d"
    texts = [p.read_text() for p in sorted(sources.glob("*.sources"))] if sources.is_dir() else []
    for text in texts:  # deb822: "Types: deb", "URIs: ...", "Suites: bookworm ..."
        for stanza in re.split(r"\n\s*\n", text):
            fields = dict(
                (key.strip().lower(), value.split())
                for key, _, value in (line.partition(":") for line in stanza.splitlines())
                if not key.startswith("#") and value
            )
            if "deb" in fields.get("types", []) and _has_release(fields.get("suites", [])):
                return fields["uris"][0]
    lists = [apt / "sources.list", *sorted(sources.glob("*.list"))]
    for path in lists:
        for line in path.read_text().splitlines() if path.is_file() else []:
            words = re.sub(r"\[[^]]*\]", "", line).split()  # drop "[signed-by=...]"
            if len(words) >= 3 and words[0] == "deb" and _has_release(words[2:3]):
                return words[1]
    raise TestbedError(f"no Debian mirror in {apt}/sources.list*; set ${MIRROR_ENV}")


def _has_release(suites: list[str]) -> bool:
    """A suite of the main archive (``bookworm``), not ``-security`` or ``-updates``."""
    return any(re.fullmatch(r"[a-z]+", suite) for suite in suites)


def _debootstrap(suite: str, target: Path, mirror: str, debs: Path, log: Path) -> None:
    debs.mkdir(parents=True, exist_ok=True)  # downloaded packages, kept for a rebuild
    # In a private mount namespace: the /proc and /sys debootstrap mounts in the target go
    # away with it, even if it is killed, and never show on this computer.
    command = [
        "unshare", "--mount", "--propagation", "private",
        "debootstrap", "--variant=minbase", f"--cache-dir={debs}",
        f"--include={','.join(PACKAGES)}", suite, str(target), mirror,
    ]  # fmt: skip
    with open(log, "w") as output:
        try:
            completed = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                timeout=BUILD_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise TestbedError(f"debootstrap took over {BUILD_TIMEOUT:g} s (see {log})") from None
    if completed.returncode != 0:
        tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
        raise TestbedError(f"debootstrap {suite} from {mirror} failed: {tail} (see {log})")


def configure(root: Path) -> None:
    """What every systemd machine shares (see the module docstring)."""
    # Each machine writes its own machine id, hostname and host key into its upper layer;
    # debootstrap left this computer's hostname and made one machine id and key set.
    (root / "etc/machine-id").write_text("")
    for stale in [root / "etc/hostname", *root.glob("etc/ssh/ssh_host_*")]:
        stale.unlink(missing_ok=True)
    dbus_id = root / "var/lib/dbus/machine-id"  # D-Bus's copy of the build's machine id
    dbus_id.unlink(missing_ok=True)
    dbus_id.symlink_to("/etc/machine-id")
    (root / "nix").mkdir(exist_ok=True)

    path_conf = root / "etc/systemd/system.conf.d/path.conf"
    path_conf.parent.mkdir(parents=True, exist_ok=True)
    path_conf.write_text(PATH_CONF)
    journal_conf = root / "etc/systemd/journald.conf.d/console.conf"
    journal_conf.parent.mkdir(parents=True, exist_ok=True)
    journal_conf.write_text(JOURNAL_TO_CONSOLE)
    bin_dir = root / SYSTEMD_BIN.lstrip("/")
    bin_dir.mkdir(parents=True)
    for program in systemd_programs(root):
        (bin_dir / Path(program).name).symlink_to(program)

    units = root / "etc/systemd/system"
    (units / "nix-daemon.socket").write_text(NIX_DAEMON_SOCKET)
    (units / "nix-daemon.service").write_text(NIX_DAEMON_SERVICE)
    wants = units / "sockets.target.wants"
    wants.mkdir(exist_ok=True)  # (enabled, as `systemctl enable` would)
    (wants / "nix-daemon.socket").symlink_to("/etc/systemd/system/nix-daemon.socket")
    boot_system = root / BOOT_SYSTEM.lstrip("/")
    boot_system.write_text(BOOT_SYSTEM_SCRIPT)
    boot_system.chmod(0o755)
    (units / "testbed-boot-system.service").write_text(BOOT_SYSTEM_SERVICE)
    wants = units / "multi-user.target.wants"
    wants.mkdir(exist_ok=True)
    (wants / "testbed-boot-system.service").symlink_to(
        "/etc/systemd/system/testbed-boot-system.service"
    )
    for unit in MASKED_UNITS:
        (units / unit).unlink(missing_ok=True)
        (units / unit).symlink_to("/dev/null")

    # useradd --root works on the template from outside, with its own login.defs.
    completed = subprocess.run(
        [
            "useradd", "--root", str(root), "--create-home", "--home-dir", "/var/lib/deploy",
            "--shell", "/bin/sh", "--password", "*", "deploy",
        ],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if completed.returncode != 0:
        raise TestbedError(f"useradd deploy in the template failed: {completed.stderr.strip()}")


def systemd_programs(root: Path) -> list[str]:
    """The programs of Debian's systemd packages (``/usr/bin/systemctl``, ...), as NixOS's
    systemd package has them in its ``bin`` directory."""
    programs: dict[str, str] = {}
    for package in ("systemd", "systemd-sysv"):
        listing = root / f"var/lib/dpkg/info/{package}.list"
        for line in listing.read_text().splitlines():
            if re.fullmatch(r"/usr/s?bin/[^/]+", line) and os.path.lexists(root / line[1:]):
                programs.setdefault(Path(line).name, line)
    return [programs[name] for name in sorted(programs)]


def trim(root: Path) -> None:
    for relative in TRIMMED:
        directory = root / relative
        if directory.is_dir():
            shutil.rmtree(directory)
            directory.mkdir()
