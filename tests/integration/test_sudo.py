"""Deploying as a user whose sudo asks for a password: asked once per run, never shown, logged
or put on a command line; on the test fleet, with real sudo, sshd, rsync and pyinfra.

web1 (nixos) and mac1 (darwin) log in as `deploy`, whose sudo asks for its password; db1 logs
in as `deploy` with password-less sudo. The deploy user's login shell on each of them records
every command line the machine receives over SSH. The tests run in order on one fleet.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pexpect
import pytest
from conftest import BIN, ROOT, STATE, Fleet, evaluate, running_fleet, set_host

MACHINES = ("web1", "db1", "mac1")
ASKS = ("web1", "mac1")  # whose sudo asks for the password
PROMPT = "sudo password for deploy"
AUDIT_LOG = "/var/log/deploy-commands.log"
# sshd runs `$SHELL -c COMMAND`: this shell keeps every command line, then runs it.
AUDIT_SHELL = f"""
cat > /etc/audit-shell <<'EOF'
#!/bin/sh
printf '%s\\n' "$*" >> {AUDIT_LOG}
exec /bin/sh "$@"
EOF
chmod 755 /etc/audit-shell
install -m 600 -o deploy /dev/null {AUDIT_LOG}
usermod --shell /etc/audit-shell deploy
"""


@pytest.fixture(scope="module")
def roster(flake: Path) -> Path:
    """The flake's hosts.json cut down to this module's machines."""
    hosts = json.loads((flake / "hosts.json").read_text())
    (flake / "hosts.json").write_text(json.dumps({name: hosts[name] for name in MACHINES}))
    set_host(flake, "web1", user="deploy", sudoPassword=True)
    set_host(flake, "db1", user="deploy")
    return flake / "hosts.json"


@pytest.fixture(scope="module")
def fleet(roster: Path) -> Fleet:
    with running_fleet("--roster", str(roster)) as testbed:
        for name in MACHINES:
            testbed.ssh(name, AUDIT_SHELL)
        yield testbed


@pytest.fixture(scope="module")
def password(fleet: Fleet) -> str:
    return (fleet.state / "keys" / "sudo-password").read_text().strip()


def fleet_file(fleet: Fleet, name: str, password_command: str | None) -> Path:
    """The test fleet's file with another `sudo_password_command` (None: none, so it asks)."""
    lines = [
        line for line in fleet.fleet_file.read_text().splitlines() if "sudo_password" not in line
    ]
    if password_command is not None:
        lines.insert(
            lines.index("data:") + 1, f"  sudo_password_command: {json.dumps(password_command)}"
        )
    path = fleet.state / name
    path.write_text("\n".join(lines) + "\n")
    return path


class CommandLineWatch(threading.Thread):
    """Reads the command line of every process of this computer (the test machines' too)
    until stopped, and keeps those that hold `secret`."""

    def __init__(self, secret: str) -> None:
        super().__init__(daemon=True)
        self.secret = secret.encode()
        self.found: list[bytes] = []
        self.scans = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            for entry in os.scandir("/proc"):
                if entry.name.isdigit():
                    try:
                        with open(f"/proc/{entry.name}/cmdline", "rb") as cmdline:
                            words = cmdline.read()
                    except OSError:
                        continue
                    if self.secret in words:
                        self.found.append(words.replace(self.secret, b"<password>"))
            self.scans += 1
            time.sleep(0.005)

    def stop(self) -> None:
        self._done.set()
        self.join()


def files_holding(fleet: Fleet, machine: str, secret: str) -> list[str]:
    """The files of a machine's /run, /tmp, /var and /etc that contain `secret` (given to grep
    on its standard input, so not on a command line)."""
    completed = subprocess.run(
        ["ssh", "-F", str(fleet.state / "ssh_config"), machine,
         "grep -rlF -f /dev/stdin /run /tmp /var /etc 2>/dev/null; true"],
        input=secret + "\n", capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    return completed.stdout.split()


def profile_system(fleet: Fleet, machine: str) -> str:
    return fleet.ssh(machine, "readlink -f /nix/var/nix/profiles/system")


# The programs the deploy starts that reach machines: each one started is recorded with its
# whole command line (every one, however short-lived, unlike the sampling watch above).
RECORDED = ("ssh", "rsync", "nix", "nix-store")


def recording_path(directory: Path, log: Path) -> str:
    """A PATH whose first directory holds a stand-in for each RECORDED program, which appends
    its command line to `log` (NUL-separated words, one line per command) and runs the real one."""
    directory.mkdir()
    for name in RECORDED:
        real = shutil.which(name)
        assert real, name
        stand_in = directory / name
        stand_in.write_text(
            f'#!/bin/sh\nprintf \'%s\\0\' {name} "$@" >> {log}; echo >> {log}\nexec {real} "$@"\n'
        )
        stand_in.chmod(0o755)
    return f"{directory}{os.pathsep}{os.environ['PATH']}"


def test_the_password_is_asked_once_and_never_shown(fleet, flake, password, tmp_path):
    report = fleet.state / "report-ask.json"
    started = tmp_path / "started.log"
    watch = CommandLineWatch(password)
    watch.start()
    deploy = pexpect.spawn(
        str(BIN / "pyinfra"),
        ["-y", "-vvv", "--debug", "inventory.py", "deploy/site.py", "--data", f"flake={flake}"],
        cwd=str(ROOT),
        env={**fleet.env, "FLAKEFLEET_FLEET": str(fleet_file(fleet, "ask.yaml", None)),
             "FLAKEFLEET_REPORT": str(report),
             "PATH": recording_path(tmp_path / "recorded", started)},
        encoding="utf-8", timeout=600, dimensions=(60, 250),
    )  # fmt: skip
    try:
        deploy.expect(PROMPT)
        transcript = deploy.before + deploy.after
        deploy.sendline(password)
        deploy.expect(pexpect.EOF)
        transcript += deploy.before
    finally:
        deploy.close()
        watch.stop()

    assert deploy.exitstatus == 0, transcript[-3000:]
    assert transcript.count(PROMPT) == 1
    assert password not in transcript  # -vvv and --debug print every command and its output
    summary = json.loads(report.read_text())
    for name in MACHINES:
        assert summary[name]["status"] == "changed", summary[name]
        assert profile_system(fleet, name) == evaluate(flake, name)
    assert password not in report.read_text()

    assert watch.scans > 10 and watch.found == []
    commands = started.read_bytes()
    assert b"ssh\0" in commands and b"rsync\0" in commands  # the record works
    assert password.encode() not in commands
    for name in MACHINES:
        commands = fleet.ssh(name, f"cat {AUDIT_LOG}")
        assert "sudo -A -p FLAKEFLEET_SUDO_PASSWORD" in commands  # the run's password, on stdin
        assert password not in commands
        assert files_holding(fleet, name, password) == []
    controller = subprocess.run(
        ["grep", "-rlF", "--exclude=sudo-password", "-f", "/dev/stdin", str(STATE),
         str(ROOT / ".flakefleet")],
        input=password + "\n", capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert controller.stdout == ""  # not in any machine's store, nor the controller's files


def test_a_refused_password_stops_those_machines_before_any_change(fleet, flake):
    wrong = "not-the-password-4711"
    for name in MACHINES:
        set_host(flake, name, version="2")
    before = {name: profile_system(fleet, name) for name in ASKS}

    deploy = fleet.deploy(
        flake, fleet_file=fleet_file(fleet, "wrong.yaml", f"printf '%s\\n' {wrong}")
    )

    assert deploy.returncode != 0
    for name in ASKS:
        error = deploy.report[name]["error"]
        assert "sudo refused to run the deploy" in error and "incorrect password" in error
        assert profile_system(fleet, name) == before[name]
    assert deploy.status("db1") == "changed"  # its sudo asks nothing: the line is read unused
    assert profile_system(fleet, "db1") == evaluate(flake, "db1")
    assert wrong not in deploy.output


def test_without_a_terminal_it_says_what_to_set(fleet, flake):
    deploy = fleet.deploy(flake, fleet_file=fleet_file(fleet, "ask.yaml", None))

    assert deploy.returncode != 0
    for name in ASKS:
        error = deploy.report[name]["error"]
        assert "no terminal to ask on" in error and "sudo_password_command" in error
    assert deploy.status("db1") == "unchanged"
    assert PROMPT not in deploy.output


def test_the_password_command_runs_once_per_run(fleet, flake, password):
    runs = fleet.state / "password-command-runs"
    command = f"echo run >> {runs}; cat {fleet.state / 'keys' / 'sudo-password'}"
    (flake / "sources-test").write_text("changed\n")  # new sources: rsync as root, with sudo

    deploy = fleet.deploy(flake, fleet_file=fleet_file(fleet, "command.yaml", command))

    assert deploy.returncode == 0, deploy.output
    assert runs.read_text() == "run\n"
    for name in ASKS:
        assert deploy.status(name) == "changed"
        assert "sources" in deploy.report[name]["changed"]
        assert profile_system(fleet, name) == evaluate(flake, name)
        assert fleet.ssh(name, "cat /var/src/config/sources-test") == "changed"
        assert fleet.ssh(name, "stat -c %U /var/src/config/sources-test") == "root"
    assert PROMPT not in deploy.output and password not in deploy.output
