"""The fleet file: what is accepted, and the one-line errors for what is not."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flakefleet.fleet import FleetError, limit_problems, limits, load_fleet

ROOT = Path(__file__).resolve().parents[2]

GOOD = """\
ssh:
  key: keys/id
  known_hosts: known_hosts
data:
  goal: boot
machines:
  - name: web1
    address: 10.0.0.1
    port: 2222
    roles: [web, frontend]
  - name: mac1
    address: mac1.lan
    user: admin
    class: darwin
    data: {goal: switch}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fleet.yaml"
    path.write_text(text)
    return path


def test_good_fleet_becomes_machines_and_host_data(tmp_path):
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "id").write_text("a key\n")
    (tmp_path / "known_hosts").write_text("")
    fleet = load_fleet(write(tmp_path, GOOD))
    web1, mac1 = fleet.machines
    assert web1.groups == ("nixos", "web", "frontend")
    assert mac1.groups == ("darwin",)
    data = fleet.host_data(web1)
    assert data["ssh_hostname"] == "10.0.0.1"
    assert data["ssh_port"] == 2222
    assert data["ssh_key"] == str(tmp_path / "keys/id")
    assert data["ssh_known_hosts_file"] == str(tmp_path / "known_hosts")
    assert data["ssh_strict_host_key_checking"] == "yes"
    assert data["goal"] == "boot"
    assert fleet.host_data(mac1)["goal"] == "switch"  # the machine's own data wins
    assert fleet.host_data(mac1)["ssh_user"] == "admin"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "machines:\n  - name: web1\n    adress: x\n",
            "machine 'web1': unknown field 'adress'",
        ),
        (
            "machines:\n  - {name: web1, address: a}\n  - {name: web1, address: b}\n",
            "machine 'web1': field 'name': duplicate machine name",
        ),
        ("machines:\n  - name: web1\n", "machine 'web1': field 'address': missing"),
        (
            "machines:\n  - {name: web1, address: a, roles: [web-server]}\n",
            "machine 'web1': field 'roles': 'web-server' is not a valid role name",
        ),
        (
            "machines:\n  - {name: web1, address: a, roles: [nixos]}\n",
            "machine 'web1': field 'roles': 'nixos' is a reserved group name",
        ),
        (
            "machines:\n  - {name: web1, address: a, class: windows}\n",
            "machine 'web1': field 'class': 'windows' is not one of nixos, darwin, home",
        ),
        (
            "machines:\n  - {name: web1, address: a, port: 70000}\n",
            "machine 'web1': field 'port': 70000 is not a port number",
        ),
        ("machines:\n  - {name: 'bad name', address: a}\n", "machine 'bad name': field 'name'"),
        ("machines:\n  - {address: a}\n", "machine #1: field 'name'"),
        ("machine:\n  - {name: a, address: a}\n", "unknown top-level field 'machine'"),
        ("machines: []\n", "field 'machines': expected a non-empty list"),
        ("ssh: {keyfile: x}\nmachines:\n  - {name: a, address: a}\n", "unknown field in 'ssh'"),
        ("machines:\n  - {name: a, address: a, address: b}\n", "duplicate key 'address'"),
        ("machines: [\n", "not valid YAML"),
        (
            "machines:\n  - {name: mac1, address: a, user: admin, data: {_sudo: true}}\n",
            "machine 'mac1': field 'data._sudo': remove it: flakefleet runs sudo itself",
        ),
        (
            "data: {sudo_password: hunter2}\nmachines:\n  - {name: a, address: a}\n",
            "field 'data.sudo_password': a password in the fleet file is a secret in plain text",
        ),
        (
            "data: {sudo_password_command: [pass]}\nmachines:\n  - {name: a, address: a}\n",
            "field 'data.sudo_password_command': expected a shell command",
        ),
    ],
)
def test_bad_fleet_is_one_line_naming_file_machine_and_field(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(FleetError) as caught:
        load_fleet(path)
    text = str(caught.value)
    assert text.startswith(f"{path}: ")
    assert message in text
    assert "\n" not in text


def test_missing_fleet_file_is_named(tmp_path):
    with pytest.raises(FleetError, match="cannot read the fleet file"):
        load_fleet(tmp_path / "nope.yaml")


def test_machine_data_adds_to_the_fleets_mappings(tmp_path):
    text = """\
data:
  nix_options: {substituters: ""}
  sources: {shared: {type: file, path: shared}}
  goal: boot
machines:
  - name: web1
    address: a
    data:
      nix_options: {cores: "2"}
      sources: {own: {type: file, path: own}}
      goal: switch
"""
    fleet = load_fleet(write(tmp_path, text))
    data = fleet.host_data(fleet.machines[0])
    assert data["nix_options"] == {"substituters": "", "cores": "2"}
    assert set(data["sources"]) == {"shared", "own"}
    assert data["goal"] == "switch"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "machines:\n  - {name: web1, address: 10.0.0.1, port: 22}\n"
            "  - {name: web2, address: 10.0.0.1, port: 22}\n",
            "machine 'web2': fields 'address', 'port', 'user': root@10.0.0.1:22 is machine "
            "'web1' already",
        ),
        (
            "machines:\n  - name: web1\n    address: a\n   roles: [web]\n",
            "not valid YAML: line 4, column 4: ",
        ),
        (
            "ssh: {key: keys/missing}\nmachines:\n  - {name: web1, address: a}\n",
            "field 'ssh.key': {dir}/keys/missing is not a file",
        ),
    ],
)
def test_mistakes_that_used_to_go_through(tmp_path, text, message):
    with pytest.raises(FleetError) as caught:
        load_fleet(write(tmp_path, text))
    assert message.format(dir=tmp_path) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_same_address_on_another_port_or_user_is_another_machine(tmp_path):
    text = (
        "machines:\n  - {name: web1, address: h, port: 22}\n  - {name: web2, address: h, port: 23}"
        "\n  - {name: web3, address: h, port: 22, user: deploy}\n"
    )
    assert len(load_fleet(write(tmp_path, text)).machines) == 3


def test_a_limit_that_selects_nothing_is_named(tmp_path):
    fleet = load_fleet(
        write(tmp_path, "machines:\n  - {name: web1, address: a, roles: [web]}\n"
                        "  - {name: web2, address: b, roles: [web]}\n")
    )  # fmt: skip
    assert limits(["deploy/site.py", "--limit", "web", "--limit=db*", "-y"]) == ["web", "db*"]
    assert limit_problems(fleet, ["web", "nixos", "web*", "all", "web2"]) == []
    assert limit_problems(fleet, ["web3", "web1,web2"]) == [
        f"--limit 'web3' matches no machine, role or class of {tmp_path}/fleet.yaml",
        f"--limit 'web1,web2' matches no machine, role or class of {tmp_path}/fleet.yaml; "
        "pyinfra does not split on commas: --limit web1 --limit web2",
    ]


def test_pyinfra_stops_on_a_limit_that_selects_nothing_before_connecting():
    """The example fleet's machines do not exist: reaching them would fail differently."""
    completed = subprocess.run(
        [str(Path(sys.executable).parent / "pyinfra"), "-y", "inventory.py", "deploy/site.py",
         "--limit", "web1", "--limit", "nosuch"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "FLAKEFLEET_FLEET": str(ROOT / "fleet.yaml")},
    )  # fmt: skip
    assert completed.returncode != 0
    assert "flakefleet: --limit 'nosuch' matches no machine, role or class of" in (
        completed.stdout + completed.stderr
    )
    assert "Connecting" not in completed.stdout + completed.stderr


def test_a_relative_flake_in_the_fleet_file_is_the_fleet_files(tmp_path):
    (tmp_path / "fleets").mkdir()
    fleet = load_fleet(
        write(tmp_path / "fleets", "data: {flake: ../flakes/fleet}\nmachines:\n"
              "  - {name: web1, address: a}\n  - {name: web2, address: b, data: {flake: /abs}}\n")
    )  # fmt: skip
    web1, web2 = fleet.machines
    data = fleet.host_data(web1, repository=Path("/repo"))
    assert data["flake"] == str(tmp_path / "flakes" / "fleet")
    assert data["flakefleet_repository"] == "/repo"
    assert fleet.host_data(web2)["flake"] == "/abs"
