"""The test fleet's pure parts: roster, client files, state directory rules (no root needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from testbed import files, layout, template
from testbed.cli import _round_trip_ms, main
from testbed.fleet import _fleet_after_up
from testbed.layout import REPO_ROOT, StatePaths, check_state_dir
from testbed.roster import Machine, load_roster, select, with_systemd

ROSTER = Path(__file__).with_name("hosts.json")


def test_roster_gives_ports_in_order() -> None:
    machines = load_roster(ROSTER, 22600)
    assert [(m.name, m.port) for m in machines[:3]] == [
        ("web1", 22601),
        ("web2", 22602),
        ("mac1", 22603),
    ]
    assert machines[3] == Machine("app1", 22604, "nixos", ("app", "web"))
    assert select(machines, 2) == machines[:2]
    with pytest.raises(layout.TestbedError, match="between 1 and 60"):
        select(machines, 61)


def test_more_machines_than_the_roster_repeat_it_in_its_proportions() -> None:
    roster = load_roster(layout.DEFAULT_ROSTER, 22400)
    fleet = select(roster, 16)
    assert fleet[:7] == roster
    assert [m.name for m in fleet[7:]] == [
        "web3", "web4", "db2", "vpn2", "build2", "mac2", "home2", "web5", "web6",
    ]  # fmt: skip
    assert [m.port for m in fleet] == list(range(22401, 22417))
    web3, mac2 = fleet[7], fleet[12]
    assert (web3.klass, web3.roles, web3.service_port, web3.systemd, web3.nix) == (
        "nixos", ("web",), 18081, True, "trixie",
    )  # fmt: skip
    assert (mac2.klass, mac2.user, mac2.sudo_password) == ("darwin", "deploy", True)
    assert web3.address != fleet[0].address  # its services bind apart from web1's
    light = select(roster, 16, light=True)
    assert [m.name for m in light if m.systemd] == [m.name for m in roster if m.systemd]
    assert {m.nix for m in light[7:]} == {"2.8"}


def test_repeating_a_roster_refuses_names_twice(tmp_path: Path) -> None:
    roster = tmp_path / "hosts.json"
    roster.write_text('{"web1": {}, "web3": {}}')  # web1's first copy would be web3 again
    with pytest.raises(layout.TestbedError, match="two machines web3"):
        select(load_roster(roster, 22400), 3)


@pytest.mark.skipif(not Path("/usr/bin/nix").exists(), reason="needs Nix")
def test_the_example_flake_has_every_machine_the_testbed_can_start() -> None:
    """The flake repeats hosts.json by the testbed's rule (example/lib/roster.nix): every
    machine of a 60-machine test fleet has its configuration, of its class."""
    outputs = {
        "nixos": "nixosConfigurations",
        "darwin": "darwinConfigurations",
        "home": "homeConfigurations",
    }
    nix = ["nix", "--extra-experimental-features", "nix-command flakes", "--option",
           "substituters", ""]  # fmt: skip
    names = {}
    for klass, output in outputs.items():
        reference = f"path:{REPO_ROOT / 'example'}#{output}"
        evaluated = subprocess.run(
            [*nix, "eval", "--json", reference, "--apply", "builtins.attrNames"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        names[klass] = set(json.loads(evaluated.stdout))
    fleet = select(load_roster(layout.DEFAULT_ROSTER, 22400), 60)
    for machine in fleet:
        name = f"{machine.user}@{machine.name}" if machine.klass == "home" else machine.name
        assert name in names[machine.klass], machine
    assert len(fleet) == len({m.name for m in fleet}) == 60
    assert {name for klass in names.values() for name in klass} >= {"web18", "db9", "mac9"}


def test_latency_is_a_round_trip_in_milliseconds() -> None:
    assert [_round_trip_ms(text) for text in ("50ms", "0.05s", "50", "0ms")] == [50, 50, 50, 0]
    for text in ("fast", "-1ms", "11s"):
        with pytest.raises(layout.TestbedError, match="--latency"):
            _round_trip_ms(text)


def test_a_relayed_machine_is_reached_at_its_own_address() -> None:
    """With a relay (``up --latency``) every client file points at the relay, which listens
    on the machine's own loopback address, and its host key is known there too."""
    machine = Machine("web1", 22401, latency_ms=50)
    assert machine.ssh_address == machine.address == "127.87.129.1"
    assert files.render_known_hosts([machine], {"web1": "ssh-ed25519 AAAA1"}) == (
        "web1,[127.0.0.1]:22401,[127.87.129.1]:22401 ssh-ed25519 AAAA1\n"
    )
    config = files.render_ssh_config([machine], StatePaths(Path("/s")))
    assert "Host web1\n  HostName 127.87.129.1\n  Port 22401\n" in config
    fleet = yaml.safe_load(files.render_fleet_file([machine]))
    assert fleet["machines"][0]["address"] == "127.87.129.1"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[]", "non-empty JSON object"),
        ('{"Web_1": {}}', "not a valid machine name"),
        ('{"web1": {"roles": "web"}}', "list of roles"),
        ("{", "not readable JSON"),
    ],
)
def test_roster_errors(tmp_path: Path, content: str, message: str) -> None:
    roster = tmp_path / "hosts.json"
    roster.write_text(content)
    with pytest.raises(layout.TestbedError, match=message):
        load_roster(roster, 22600)


def test_fleet_file_has_the_documented_shape() -> None:
    machines = [Machine("web1", 22401, "nixos", ("web",)), Machine("db1", 22403, "nixos", ())]
    text = files.render_fleet_file(machines)
    assert text.splitlines()[:17] == [
        "# Written by `python -m testbed up`: the test fleet, as a flakefleet fleet file.",
        "ssh:",
        "  key: keys/id_ed25519",
        "  known_hosts: known_hosts",
        "data:",
        "  nix_options:",
        '    substituters: ""',
        "  # A test machine reboots when its PID 1 gets SIGUSR1 (see testbed/machine.py).",
        '  reboot_command: "kill -USR1 1"',
        "machines:",
        "  - name: web1",
        "    address: 127.0.0.1",
        "    port: 22401",
        "    user: root",
        "    class: nixos",
        "    roles: [web]",
        "  - name: db1",
    ]
    assert yaml.safe_load(text)["machines"][1] == {
        "name": "db1",
        "address": "127.0.0.1",
        "port": 22403,
        "user": "root",
        "class": "nixos",
        "roles": [],
    }


def test_fleet_file_quotes_what_yaml_would_misread() -> None:
    machine = Machine("web1", 22401, "nixos", ("on", "a b", "1.5"))
    loaded = yaml.safe_load(files.render_fleet_file([machine]))
    assert loaded["machines"][0]["roles"] == ["on", "a b", "1.5"]


def test_known_hosts_and_ssh_config() -> None:
    machines = [Machine("web1", 22401), Machine("web2", 22402)]
    keys = {"web1": "ssh-ed25519 AAAA1", "web2": "ssh-ed25519 AAAA2"}
    assert files.render_known_hosts(machines, keys) == (
        "web1,[127.0.0.1]:22401 ssh-ed25519 AAAA1\nweb2,[127.0.0.1]:22402 ssh-ed25519 AAAA2\n"
    )
    config = files.render_ssh_config(machines, StatePaths(Path("/s")))
    assert "Host web2\n  HostName 127.0.0.1\n  Port 22402\n  User root\n" in config
    for line in (
        "IdentityFile /s/keys/id_ed25519",
        "IdentitiesOnly yes",
        "StrictHostKeyChecking yes",
        "BatchMode yes",
        "UserKnownHostsFile /s/known_hosts",
        "LogLevel ERROR",
    ):
        assert config.count(f"  {line}\n") == 2


def test_sshd_config() -> None:
    config = files.sshd_config(22401)
    assert config.splitlines()[1:4] == [
        "Port 22401",
        "ListenAddress 127.0.0.1",
        "HostKey /etc/ssh/testbed/ssh_host_ed25519_key",
    ]
    assert "AuthorizedKeysFile /etc/ssh/testbed/authorized_keys\n" in config
    assert "UsePAM no\n" in config


def test_running_machines_keep_their_entries() -> None:
    old_web1 = Machine("web1", 22501)
    wanted = [Machine("web1", 22401), Machine("web2", 22402)]
    previous = {"web1": old_web1, "db1": Machine("db1", 22503), "x": Machine("x", 22504)}
    fleet = _fleet_after_up(wanted, previous, running={"web1", "db1"})
    assert fleet == [old_web1, Machine("web2", 22402), Machine("db1", 22503)]


@pytest.mark.parametrize("path", ["/etc/tb", "/var/lib/tb", "/nix/tb", "/run/tb", "/a b", "/a,b"])
def test_unsafe_state_directories_are_refused(path: str) -> None:
    with pytest.raises(layout.TestbedError):
        check_state_dir(Path(path))


@pytest.mark.parametrize("under", ["tmp", "repository"])
def test_state_directory_may_be_under_tmp_or_the_repository(
    under: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The command line takes such a state directory (it refuses /etc/tb, above)."""
    state = tmp_path / "state" if under == "tmp" else REPO_ROOT / ".testbed-unit-probe"
    monkeypatch.setenv("FLAKEFLEET_TESTBED_STATE", str(state))
    monkeypatch.setenv("FLAKEFLEET_TESTBED_PORT", "22600")
    assert main(["status", "--roster", str(ROSTER)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert [line.split()[2] for line in captured.out.splitlines()] == ["down"] * 5
    monkeypatch.setenv("FLAKEFLEET_TESTBED_STATE", "/etc/tb")
    assert main(["status", "--roster", str(ROSTER)]) == 1
    assert "must not be under /etc" in capsys.readouterr().err


def test_cli_errors_are_one_line_and_exit_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FLAKEFLEET_TESTBED_STATE", str(tmp_path / "state"))
    assert main(["up", "--roster", str(tmp_path / "missing.json")]) == 1
    assert main(["frobnicate"]) == 1
    assert main(["reboot", "web1"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3
    assert all(line.startswith("testbed: error: ") for line in lines)
    assert "unknown machine 'web1'" in lines[2]


def test_status_without_state_lists_the_roster_as_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FLAKEFLEET_TESTBED_STATE", str(tmp_path / "state"))
    monkeypatch.setenv("FLAKEFLEET_TESTBED_PORT", "22600")
    assert main(["status", "--roster", str(ROSTER)]) == 0
    assert capsys.readouterr().out.splitlines()[0].split() == ["web1", "22601", "down", "-"]


@pytest.mark.parametrize(
    ("module", "refusal"),
    [("testbed.machine", "not PID 1"), ("testbed.nspawn", "refusing to boot web1")],
)
def test_a_machine_refuses_to_boot_outside_its_place(module: str, refusal: str) -> None:
    """Run by hand (not as PID 1 of its namespaces, or without its files), a machine's
    entry point does nothing to this computer."""
    completed = subprocess.run(
        [sys.executable, "-m", module, "web1", "/nonexistent"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 1
    assert refusal in completed.stderr


def test_test_roster_is_valid_json() -> None:
    assert list(json.loads(ROSTER.read_text())) == ["web1", "web2", "mac1", "app1", "app2"]


def test_roster_knob_makes_systemd_machines(tmp_path: Path) -> None:
    roster = tmp_path / "hosts.json"
    roster.write_text('{"web1": {"systemd": true}, "web2": {}}')
    assert [m.systemd for m in load_roster(roster, 22600)] == [True, False]
    roster.write_text('{"web1": {"systemd": "yes"}}')
    with pytest.raises(layout.TestbedError, match="systemd must be a boolean"):
        load_roster(roster, 22600)
    roster.write_text('{"mac1": {"class": "darwin", "systemd": true}}')
    with pytest.raises(layout.TestbedError, match="darwin machine cannot run systemd"):
        load_roster(roster, 22600)


def test_roster_nix_knob_picks_the_machine_and_its_nix(tmp_path: Path) -> None:
    roster = tmp_path / "hosts.json"
    roster.write_text(
        '{"a": {}, "b": {"nix": "2.8"}, "c": {"nix": "trixie"}, "d": {"nix": "sid"},'
        ' "e": {"systemd": true}, "f": {"systemd": true, "nix": "sid"}}'
    )
    machines = load_roster(roster, 22600)
    assert [(m.systemd, m.nix, m.suite) for m in machines] == [
        (False, "2.8", None),
        (False, "2.8", None),
        (True, "trixie", "trixie"),
        (True, "sid", "sid"),
        (True, "trixie", "trixie"),
        (True, "sid", "sid"),
    ]
    for content, message in (
        ('{"a": {"nix": "2.18"}}', r"roster .*hosts.json: a: nix must be one of 2.8, trixie, sid"),
        ('{"a": {"systemd": true, "nix": "2.8"}}', "a systemd machine runs its root's Nix"),
        ('{"a": {"systemd": false, "nix": "sid"}}', "Nix sid runs only on a systemd machine"),
        ('{"m": {"class": "darwin", "nix": "trixie"}}', "darwin machine cannot run systemd"),
    ):
        roster.write_text(content)
        with pytest.raises(layout.TestbedError, match=message):
            load_roster(roster, 22600)


def test_the_default_fleet_mixes_machines_and_nix_versions() -> None:
    machines = {m.name: m for m in load_roster(layout.DEFAULT_ROSTER, 22400)}
    assert {name for name, m in machines.items() if m.systemd} >= {"web1", "web2", "db1"}
    assert machines["vpn1"].nix == machines["build1"].nix == "2.8"  # namespace machines
    assert not machines["mac1"].systemd


def test_up_systemd_names_machines() -> None:
    machines = load_roster(ROSTER, 22600)
    chosen = with_systemd(machines, ["web2", "app1"])
    assert [(m.name, m.nix) for m in chosen if m.systemd] == [
        ("web2", "trixie"),
        ("app1", "trixie"),
    ]
    assert with_systemd(machines, []) == machines
    with pytest.raises(layout.TestbedError, match="no machine db9"):
        with_systemd(machines, ["db9"])
    with pytest.raises(layout.TestbedError, match="darwin"):
        with_systemd(machines, ["mac1"])


def test_fleet_file_gives_systemd_machines_their_reboot_command() -> None:
    machines = [Machine("web1", 22401, systemd=True), Machine("web2", 22402)]
    loaded = yaml.safe_load(files.render_fleet_file(machines))
    assert loaded["data"]["reboot_command"] == "kill -USR1 1"
    assert loaded["machines"][0]["data"] == {"reboot_command": "systemctl reboot"}
    assert "data" not in loaded["machines"][1]


def test_systemd_sshd_config_is_a_drop_in() -> None:
    config = files.systemd_sshd_config(22401)
    assert "Port 22401\nListenAddress 127.0.0.1\n" in config
    assert "HostKey /etc/ssh/ssh_host_ed25519_key\n" in config
    assert "AuthorizedKeysFile .ssh/authorized_keys /etc/ssh/authorized_keys.d/%u\n" in config
    # Debian's own UsePAM yes stays: each login gets a logind session, as on NixOS.
    assert not [line for line in config.splitlines() if line.startswith("UsePAM")]


@pytest.mark.parametrize(
    ("name", "text"),
    [
        (
            "sources.list.d/debian.sources",
            "Types: deb\n# a comment\nURIs: http://mirror.example/debian\n"
            "Suites: bookworm bookworm-updates\nComponents: main\n\n"
            "Types: deb\nURIs: http://security.example/debian-security\n"
            "Suites: bookworm-security\n",
        ),
        (
            "sources.list",
            "deb http://security.example/debian-security bookworm-security main\n"
            "deb [signed-by=/k.gpg] http://mirror.example/debian bookworm main\n",
        ),
    ],
)
def test_template_uses_this_computers_debian_mirror(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, text: str
) -> None:
    monkeypatch.delenv(template.MIRROR_ENV, raising=False)
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / name).write_text(text)
    assert template.debian_mirror(tmp_path) == "http://mirror.example/debian"


def test_template_directory_is_named_by_its_recipe(tmp_path: Path) -> None:
    directory = template.template_dir("trixie", tmp_path)
    assert directory.parent == tmp_path and directory.name.startswith("trixie-")
    assert template.template_dir("trixie", tmp_path) == directory
    assert template.template_dir("sid", tmp_path).name.startswith("sid-")
    packages = template.recipe("trixie")["packages"]
    assert "nix-bin" in packages and "python3" in packages  # type: ignore[operator]
    with pytest.raises(layout.TestbedError, match="no systemd machine template for Debian"):
        template.ensure("bookworm")
