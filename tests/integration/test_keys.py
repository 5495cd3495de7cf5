"""Keys on the test fleet: secrets decrypted on the controller with age and uploaded over the
machines' connections (colmena's deployment.keys), with real age, sshd, sudo and pyinfra.

web1 logs in as root; mac1 (darwin) as `deploy`, whose sudo asks for its password. The tests
run in order on one fleet; each starts from the state the previous one left.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, Fleet, Hidden, fleet_of, set_host

MACHINES = ("web1", "mac1")
MANIFEST = "/var/lib/flakefleet/keys"
ROOT_GROUP = {"web1": "root", "mac1": "wheel"}  # macOS has no group root: gid 0 is wheel


@pytest.fixture(scope="module")
def fleet(flake: Path) -> Iterator[Fleet]:
    with fleet_of(flake, *MACHINES) as testbed:
        yield testbed


@pytest.fixture(scope="module")
def age(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | str]:
    """The operator's identity, a stranger's, and the secrets: one text (easy to look for in
    output and files), one binary (exact bytes)."""
    directory = tmp_path_factory.mktemp("age")
    identity, stranger = directory / "identity.txt", directory / "stranger.txt"
    for path in (identity, stranger):
        subprocess.run(["age-keygen", "-o", str(path)], check=True, capture_output=True)
    secret = "s3cret-" + os.urandom(12).hex()
    binary = os.urandom(300) + b"\n\0end"
    (directory / "binary").write_bytes(binary)
    return {
        "dir": directory,
        "identity": identity,
        "stranger": stranger,
        "secret": secret,
        "binary": directory / "binary",
        "token": encrypt(identity, secret.encode(), directory / "token.age"),
    }


def encrypt(identity: Path, plaintext: bytes, path: Path) -> Path:
    recipient = subprocess.run(
        ["age-keygen", "-y", str(identity)], check=True, capture_output=True, text=True
    ).stdout.strip()
    subprocess.run(["age", "-r", recipient, "-o", str(path)], input=plaintext, check=True)
    return path


def keys_data(age: dict, keys: dict) -> tuple[str, ...]:
    return ("--data", f"keys={json.dumps(keys)}", "--data", f"age_identity={age['identity']}")


def standard_keys(age: dict) -> dict:
    return {
        "app-token": {"age_file": str(age["token"]), "owner": "deploy", "mode": "0440",
                      "group": "deploy"},
        "blob": {"command": f"cat {age['binary']}", "destination": "/var/lib/app/blob"},
    }  # fmt: skip


def on_machine(fleet: Fleet, machine: str, path: str) -> tuple[str, Hidden]:
    """A file's owner, group and mode, and its content."""
    found = fleet.ssh(machine, f"stat -c '%U %G %a' {path} && base64 -w0 {path}", check=False)
    lines = found.splitlines()
    if len(lines) != 2:
        return "", Hidden(b"")
    return lines[0], Hidden(base64.b64decode(lines[1]))


class ProcessWatch(threading.Thread):
    """Polls `ps -eww -o args` on this computer (the controller) until stopped, and keeps each
    command line that holds one of the `secrets` (the test machines' processes are this
    computer's too, but each machine is also polled on its own, below)."""

    def __init__(self, secrets: list[bytes]) -> None:
        super().__init__(daemon=True)
        self.secrets = secrets
        self.found: list[bytes] = []
        self.polls = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            listing = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True).stdout
            self.found += [line for line in listing.splitlines() if self.holds(line)]
            self.polls += 1

    def holds(self, line: bytes) -> bool:
        return any(secret in line for secret in self.secrets)

    def stop(self) -> None:
        self._done.set()
        self.join()


MACHINE_POLL = "/tmp/ps-poll.log"


def start_machine_poll(fleet: Fleet, machine: str) -> subprocess.Popen:
    """`ps -eww -o args` in a loop on the machine, into a file read afterwards (the secret is
    never given to the machine to look for)."""
    return subprocess.Popen(
        ["ssh", "-F", str(fleet.state / "ssh_config"), machine,
         f"rm -f {MACHINE_POLL}; n=0; while [ ! -e /tmp/ps-poll.stop ]; do "
         f"ps -eww -o args >> {MACHINE_POLL}; n=$((n+1)); done; echo $n; rm /tmp/ps-poll.stop"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


def stop_machine_poll(fleet: Fleet, machine: str, poll: subprocess.Popen) -> tuple[int, bytes]:
    fleet.ssh(machine, "touch /tmp/ps-poll.stop")
    polls = int(poll.communicate(timeout=60)[0].strip() or 0)
    listing = subprocess.run(
        ["ssh", "-F", str(fleet.state / "ssh_config"), machine, f"cat {MACHINE_POLL}"],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    fleet.ssh(machine, f"rm -f {MACHINE_POLL}")
    return polls, listing


def forms(secret: bytes) -> list[bytes]:
    """The secret, and how it travels: base64 at each of the three alignments in a stream."""
    found = [secret]
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + secret)[4 if offset else 0 :]
        found.append(encoded[: max(16, len(encoded) - 4)])
    return found


# ----------------------------------------------------------------------------------------------


def test_a_no_op_redeploy_without_keys_is_the_baseline(fleet, flake, age):
    """The fleet converged with no key declared; a no-op redeploy's SSH commands, the baseline
    for the no-op with keys below."""
    first = fleet.deploy(flake)
    assert first.returncode == 0, first.output
    before = {machine: fleet.sessions(machine) for machine in MACHINES}
    again = fleet.deploy(flake)
    assert again.returncode == 0, again.output
    age["baseline"] = {m: fleet.sessions(m) - before[m] for m in MACHINES}  # type: ignore[assignment]


def test_keys_arrive_exact_and_never_show(fleet, flake, age):
    secret = str(age["secret"]).encode()
    binary = Path(age["binary"]).read_bytes()
    watched = [*forms(secret), *forms(binary[:64])]
    watch = ProcessWatch(watched)
    watch.start()
    polls = {machine: start_machine_poll(fleet, machine) for machine in MACHINES}
    try:
        result = fleet.deploy(flake, "-vvv", *keys_data(age, standard_keys(age)))
    finally:
        watch.stop()
        machine_polls = {m: stop_machine_poll(fleet, m, p) for m, p in polls.items()}
    assert result.returncode == 0, result.output
    for machine in MACHINES:
        assert result.status(machine) == "changed", result.report
        assert "keys" in result.report[machine]["changed"]
        assert on_machine(fleet, machine, "/run/keys/app-token") == (
            "deploy deploy 440",
            Hidden(secret),
        )
        owner = f"root {ROOT_GROUP[machine]} 400"
        assert on_machine(fleet, machine, "/var/lib/app/blob") == (owner, Hidden(binary))
        # no temporary file left beside them; NixOS's /run/keys as it was
        if machine == "web1":
            assert fleet.ssh(machine, "stat -c '%a %U %G' /run/keys") == "750 root keys"
        assert fleet.ssh(machine, "ls -A /run/keys /var/lib/app").split() == [
            "/run/keys:", "app-token", "/var/lib/app:", "blob",
        ]  # fmt: skip

    # Never on a command line, here or on the machines, while it was uploaded.
    assert watch.polls > 50 and not watch.found, (watch.polls, len(watch.found))  # not shown
    for machine, (count, listing) in machine_polls.items():
        assert count > 20, (machine, count)
        assert not any(form in listing for form in watched), machine
    # Not in pyinfra's output at -vvv, nor in the JSON report.
    assert "Upload keys" in result.output
    text = result.output.encode() + json.dumps(result.report).encode()
    assert not any(form in text for form in watched)
    # Not in either store, /var/src, logs or anywhere else on the machines but the keys.
    for machine in MACHINES:
        holding = files_holding(fleet, machine, age["secret"])
        assert holding == ["/run/keys/app-token"], (machine, holding)
    assert controller_store_holding(str(age["secret"])) == []
    # Nor in what the controller and the test fleet keep (state, consoles, machines' logs).
    for directory in (ROOT / ".flakefleet", fleet.state):
        found = subprocess.run(
            ["grep", "-rlF", "-f", "/dev/stdin", str(directory)],
            input=str(age["secret"]) + "\n",
            capture_output=True,
            text=True,
        )
        assert found.stdout == "", found.stdout


def files_holding(fleet: Fleet, machine: str, secret: str) -> list[str]:
    """Files of the machine's store, /var/src, /run, /tmp, /var, /etc and homes that contain
    `secret` (given to grep on standard input, not in its command line)."""
    completed = subprocess.run(
        ["ssh", "-F", str(fleet.state / "ssh_config"), machine,
         "grep -rlF -f /dev/stdin /nix/store /var/src /run /tmp /var /etc /root 2>/dev/null;"
         " true"],
        input=secret + "\n", capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    return sorted(completed.stdout.split())


def controller_store_holding(secret: str) -> list[str]:
    """Files of the controller's whole store (a few hundred MB here) that contain `secret`."""
    completed = subprocess.run(
        ["grep", "-rlF", "-f", "/dev/stdin", "/nix/store"],
        input=secret + "\n", capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert completed.returncode in (0, 1), completed.stderr
    return completed.stdout.split()


def test_a_no_op_redeploy_with_keys_costs_no_extra_ssh_command(fleet, flake, age):
    before = {machine: fleet.sessions(machine) for machine in MACHINES}
    result = fleet.deploy(flake, *keys_data(age, standard_keys(age)))
    assert result.returncode == 0, result.output
    for machine in MACHINES:
        assert result.status(machine) == "unchanged", result.report
        assert fleet.sessions(machine) - before[machine] == age["baseline"][machine], machine


def test_the_plan_names_the_keys_that_would_change_and_runs_no_command(fleet, flake, age):
    """mac1's manifest is root's: the plan reads it through sudo with the password, as a
    deploy does. A changed age file's key would be uploaded, a key no longer declared removed,
    a command's key is not known: the plan runs no command. Nothing changes."""
    ran = Path(age["dir"]) / "command-ran"
    changed = encrypt(Path(age["identity"]), b"another secret", Path(age["dir"]) / "new.age")
    keys = {
        "app-token": {**standard_keys(age)["app-token"], "age_file": str(changed)},
        "probe": {"command": f"touch {ran}; echo probe"},
    }
    before = {machine: fleet.ssh(machine, f"cat {MANIFEST}; ls -lR /run/keys /var/lib/app")
              for machine in MACHINES}  # fmt: skip

    result = fleet.deploy(flake, *keys_data(age, keys), deploy_file="deploy/plan.py")

    assert result.returncode == 0, result.output
    for machine in MACHINES:
        said = [line.strip() for line in result.report[machine]["plan"]]
        assert [line for line in said if line.startswith("keys: ")] == [
            "keys: would upload app-token",
            "keys: would remove blob",
            "keys: probe: not known (its content comes from a command, which a plan does not run)",
        ], said
        after = fleet.ssh(machine, f"cat {MANIFEST}; ls -lR /run/keys /var/lib/app")
        assert after == before[machine], machine
    assert not ran.exists()
    assert str(age["secret"]) not in result.output


@pytest.mark.parametrize("damage", ["tampered", "truncated", "stranger"])
def test_a_bad_age_file_stops_the_run_before_any_upload(fleet, flake, age, damage):
    good = Path(age["token"]).read_bytes()
    bad = age["dir"] / f"{damage}.age"
    if damage == "tampered":
        middle = len(good) - 20  # in the payload, after the header
        bad.write_bytes(good[:middle] + bytes([good[middle] ^ 1]) + good[middle + 1 :])
    elif damage == "truncated":
        bad.write_bytes(good[:-10])
    else:
        encrypt(Path(age["stranger"]), str(age["secret"]).encode(), bad)
    keys = {**standard_keys(age), "other": {"age_file": str(bad)}}
    sessions = {machine: fleet.sessions(machine) for machine in MACHINES}

    result = fleet.deploy(flake, *keys_data(age, keys))

    assert result.returncode != 0
    lines = [line for line in result.output.splitlines() if line.startswith("flakefleet: ")]
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"flakefleet: mac1, web1: key 'other' (--data, field 'age_file'): "
                               f"{bad}: cannot decrypt: "), lines  # fmt: skip
    for machine in MACHINES:
        assert fleet.sessions(machine) == sessions[machine], machine  # not even contacted
        assert fleet.ssh(machine, "ls /run/keys") == "app-token"


def test_keys_no_longer_declared_are_removed(fleet, flake, age):
    keys = standard_keys(age)
    del keys["blob"]
    result = fleet.deploy(flake, *keys_data(age, keys))
    assert result.returncode == 0, result.output
    for machine in MACHINES:
        assert "keys" in result.report[machine]["changed"], result.report
        assert fleet.ssh(machine, "ls -A /var/lib/app") == ""
        manifest = fleet.ssh(machine, f"cat {MANIFEST}").splitlines()
        assert [line.split()[0] for line in manifest] == ["app-token"], manifest


def test_keys_on_tmpfs_come_back_after_a_reboot(fleet, flake, age):
    keys = standard_keys(age)
    del keys["blob"]
    fleet.testbed("reboot", "web1")
    fleet.wait_for("web1", "cat /run/current-system/nixos-version")
    assert fleet.ssh("web1", "ls /run/keys", check=False) == ""
    result = fleet.deploy(flake, *keys_data(age, keys))
    assert result.returncode == 0, result.output
    assert result.report["web1"]["changed"] == ["keys"], result.report
    assert result.status("mac1") == "unchanged", result.report
    secret = str(age["secret"]).encode()
    assert on_machine(fleet, "web1", "/run/keys/app-token") == ("deploy deploy 440", Hidden(secret))


def test_a_reboot_the_deploy_makes_gets_the_keys_uploaded_again(fleet, flake, age):
    keys = standard_keys(age)
    del keys["blob"]
    boot = fleet.ssh("web1", "cat /proc/sys/kernel/random/boot_id")
    result = fleet.deploy(flake, "--limit", "web1", "--data", "reboot=always",
                          *keys_data(age, keys))  # fmt: skip
    assert result.returncode == 0, result.output
    assert fleet.ssh("web1", "cat /proc/sys/kernel/random/boot_id") != boot
    assert result.report["web1"]["changed"] == ["rebooted", "keys"], result.report
    secret = str(age["secret"]).encode()
    assert on_machine(fleet, "web1", "/run/keys/app-token") == ("deploy deploy 440", Hidden(secret))


def test_an_owner_the_new_system_creates_needs_post_activation(fleet, flake, age):
    set_host(flake, "web1", users=["appsvc"], version="2")
    keys = {"svc": {"age_file": str(age["token"]), "owner": "appsvc", "group": "appsvc"}}
    before = fleet.ssh("web1", "readlink /run/current-system")

    early = fleet.deploy(flake, "--limit", "web1", *keys_data(age, keys))

    assert early.returncode != 0
    error = early.report["web1"]["error"]
    assert re.search(r"key svc: its owner appsvc does not exist \(yet\).*post-activation", error)
    assert fleet.ssh("web1", "readlink /run/current-system") == before  # not activated
    assert fleet.ssh("web1", "ls -A /run/keys") == "app-token"  # nothing written, none removed

    keys["svc"]["upload"] = "post-activation"
    late = fleet.deploy(flake, "--limit", "web1", *keys_data(age, keys))

    assert late.returncode == 0, late.output
    assert fleet.ssh("web1", "readlink /run/current-system") != before
    secret = str(age["secret"]).encode()
    assert on_machine(fleet, "web1", "/run/keys/svc") == ("appsvc appsvc 400", Hidden(secret))
    assert fleet.ssh("web1", "ls -A /run/keys") == "svc"
