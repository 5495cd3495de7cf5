"""Fact parsing, from the output the commands print on a machine."""

import json

from facts.machine import SECTION, MachineSnapshot
from facts.nix import SystemGenerations
from facts.sources import Sources
from flakefleet.models import Generation

WEB1 = "/nix/store/60nw2zzmkadwb1ilqj0ssaxm5adp7xd6-nixos-system-web1-1"


def test_generations():
    output = [
        "   1   2026-11-22 02:56:28   ",
        "   2   2026-11-22 03:10:02   (current)",
        "link system-1-link /nix/store/aaa-nixos-system-web1-1",
        "link system-2-link /nix/store/bbb-nixos-system-web1-2",
    ]
    assert SystemGenerations().process(output) == [
        Generation(1, "2026-11-22 02:56:28", False, "/nix/store/aaa-nixos-system-web1-1"),
        Generation(2, "2026-11-22 03:10:02", True, "/nix/store/bbb-nixos-system-web1-2"),
    ]


def test_sources_managed_and_foreign():
    state = Sources().process(
        ["exists", "managed", "source config .flakefleet/config/abc123", "source notes "]
    )
    assert state.exists and state.managed
    assert state.sources == {"config": "abc123", "notes": None}


def test_machine_state_from_one_command():
    output = [
        f"{SECTION}current_system",
        WEB1,
        f"{SECTION}booted_system",
        f"{SECTION}profile_system",
        WEB1,
        f"{SECTION}generations",
        "   1   2026-11-22 02:56:28   (current)",
        f"{SECTION}var_src",
    ]
    state = MachineSnapshot().process(output)
    assert state.current_system == WEB1
    assert state.booted_system is None
    assert state.profile_system == WEB1
    assert [g.number for g in state.generations] == [1]
    assert not state.var_src.exists


def test_machine_command_has_every_section():
    command = MachineSnapshot().command()
    for name in ("current_system", "booted_system", "profile_system", "generations", "var_src"):
        assert f"{SECTION}{name}" in command


def test_the_facts_can_be_printed_by_pyinfra():
    """`pyinfra inventory.py fact facts.machine.MachineSnapshot` prints what it read: pyinfra's
    encoder asks an object it does not know for `to_json()`. (Not imported from pyinfra_cli
    here: importing it monkey-patches this whole test process with gevent.)"""
    from flakefleet.models import MachineState, VarSrc

    def json_encode(value: object) -> object:
        return value.to_json()  # type: ignore[attr-defined]

    state = MachineState(
        generations=[Generation(1, "2026-11-22 02:56:28", True, "/nix/store/a-system")],
        var_src=VarSrc(stored=frozenset({"config"})),
    )
    printed = json.loads(json.dumps(state, default=json_encode))
    assert printed["generations"][0]["system"] == "/nix/store/a-system"
    assert printed["var_src"]["stored"] == ["config"]
