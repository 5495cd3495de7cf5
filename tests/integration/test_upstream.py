"""Where flakefleet does what nixos-rebuild, darwin-rebuild and nix do, it does it their way:
boot entries and pruning, reboot detection, generations read without root, the flake's file
set, and switch-to-configuration's lock and exit statuses (issue 10).

The tests run in order on one fleet; each uses its own machine where it can.
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from pathlib import Path

from conftest import NIX, ROOT, evaluate, needs_real_nix, real_nix, set_host

from facts.nix import SystemGenerations
from flakefleet import nix
from flakefleet.evaluation import evaluate_systems
from flakefleet.fleet import load_fleet

BOOT_ID = "cat /proc/sys/kernel/random/boot_id"
PROFILE = "/nix/var/nix/profiles/system"
SWITCH_LOCK = "/run/nixos/switch-to-configuration.lock"


def generations(fleet, machine: str) -> list[int]:
    """The system profile's generation numbers, from its links (as root on the machine)."""
    links = fleet.ssh(machine, f"ls -d {PROFILE}-*-link 2>/dev/null || true").split()
    return sorted(int(re.search(r"-(\d+)-link$", link)[1]) for link in links)


def state(fleet, machine: str) -> tuple[str, str, list[int]]:
    """What the machine runs, what its profile selects, and its generations."""
    running, selected = fleet.ssh(
        machine, f"readlink -f /run/current-system; readlink -f {PROFILE}"
    ).splitlines()
    return running, selected, generations(fleet, machine)


def test_converge_first(fleet, flake):
    for machine in ("web1", "web2", "db1", "vpn1", "mac1"):
        result = fleet.deploy(flake, "--limit", machine)
        assert result.returncode == 0, result.output


def test_pruning_leaves_no_boot_entry_whose_closure_was_collected(fleet, flake):
    """The bootloader lists every generation when a switch installs it; pruning after it must
    leave no entry naming a collected system (the NixOS manual: rebuild the boot entries)."""
    set_host(flake, "web1", version="2")
    result = fleet.deploy(flake, "--limit", "web1", "--data", "keep_generations=1")
    assert result.returncode == 0, result.output
    assert any(c.startswith("pruned") for c in result.report["web1"]["changed"]), result.report
    entries = fleet.ssh("web1", "cat /var/lib/fake-bootloader/entries").splitlines()
    assert entries, "the bootloader wrote no menu"
    for entry in entries:
        number, system = entry.split()
        assert fleet.ssh("web1", f"test -e {system} && echo boots", check=False) == "boots", (
            f"boot entry {number} names {system}, which was collected"
        )
    assert [int(entry.split()[0]) for entry in entries] == generations(fleet, "web1")


def test_pruning_after_a_rollback_keeps_the_newest_and_the_running_generation(fleet, flake):
    """keep_generations keeps the newest N generations plus the one the machine runs (README);
    Nix's own `--delete-generations +N` keeps every generation newer than the current one."""
    for version in ("2", "3", "4"):
        set_host(flake, "web2", version=version)
        assert fleet.deploy(flake, "--limit", "web2").returncode == 0
    assert generations(fleet, "web2") == [1, 2, 3, 4]
    back = fleet.deploy(
        flake, "--limit", "web2", "--data", "generation=2", deploy_file="deploy/rollback.py"
    )
    assert back.returncode == 0, back.output
    # A test deploy adds no generation; the profile still selects generation 2.
    set_host(flake, "web2", version="5")
    result = fleet.deploy(
        flake, "--limit", "web2", "--data", "keep_generations=2", deploy_file="deploy/test.py"
    )
    assert result.returncode == 0, result.output
    assert generations(fleet, "web2") == [2, 3, 4]  # newest two, and generation 2 (selected)
    assert fleet.ssh("web2", f"readlink {PROFILE}") == "system-2-link"


def test_a_switch_that_keeps_the_kernel_needs_no_reboot(fleet, flake):
    """As in NixOS, kernel, initrd and modules are store paths of their own: a new generation
    with the same kernel needs no reboot; a new kernel does."""
    set_host(flake, "web1", version="k1")
    first = fleet.deploy(flake, "--limit", "web1", "--data", "reboot=always")
    assert first.returncode == 0, first.output  # it has booted a system with kernel 6.6.1
    boot_id = fleet.ssh("web1", BOOT_ID)
    set_host(flake, "web1", version="k2")
    same = fleet.deploy(flake, "--limit", "web1", "--data", "reboot=when-needed")
    assert same.returncode == 0, same.output
    assert "rebooted" not in same.report["web1"]["changed"], same.report["web1"]
    assert fleet.ssh("web1", BOOT_ID) == boot_id
    set_host(flake, "web1", version="k3", kernel="6.6.2")
    try:
        newer = fleet.deploy(flake, "--limit", "web1", "--data", "reboot=when-needed")
    finally:
        set_host(flake, "web1", version="1", kernel=None)
    assert newer.returncode == 0, newer.output
    assert "rebooted" in newer.report["web1"]["changed"], newer.report["web1"]
    assert fleet.ssh("web1", BOOT_ID) != boot_id


def test_a_container_system_needs_no_reboot(fleet, flake):
    """A toplevel without kernel, initrd and modules (boot.isContainer) on both sides: the
    kernel did not change, so reboot=when-needed does not reboot."""
    set_host(flake, "vpn1", version="c1", container=True)
    first = fleet.deploy(flake, "--limit", "vpn1", "--data", "reboot=always")
    assert first.returncode == 0, first.output  # now it has booted a container system
    assert fleet.ssh("vpn1", "readlink -f /run/booted-system") == evaluate(flake, "vpn1")
    boot_id = fleet.ssh("vpn1", BOOT_ID)
    set_host(flake, "vpn1", version="c2")
    result = fleet.deploy(flake, "--limit", "vpn1", "--data", "reboot=when-needed")
    assert result.returncode == 0, result.output
    assert "rebooted" not in result.report["vpn1"]["changed"], result.report["vpn1"]
    assert fleet.ssh("vpn1", BOOT_ID) == boot_id


def test_plan_as_a_non_root_user_reads_the_generations(fleet, flake):
    """mac1 logs in as `deploy`, which cannot take root's system profile lock (nor has Nix on
    its PATH): the plan still reads its generations (from the profile's links), so a profile
    rolled back by hand shows as drift."""
    assert fleet.ssh("deploy@mac1", "id -un") == "deploy"
    assert next(m for m in load_fleet(fleet.fleet_file).machines if m.name == "mac1").user == (
        "deploy"
    )
    set_host(flake, "mac1", version="2")
    assert fleet.deploy(flake, "--limit", "mac1").returncode == 0
    fleet.ssh("mac1", f"nix-env -p {PROFILE} --switch-generation 1")  # by hand, as root
    try:
        result = fleet.deploy(flake, "--limit", "mac1", deploy_file="deploy/plan.py")
    finally:
        fleet.ssh("mac1", f"nix-env -p {PROFILE} --switch-generation 2")
    assert result.returncode == 0, result.output
    plan = result.report["mac1"]["plan"]
    drift = [line.strip() for line in plan if "drift:" in line]
    assert "drift: its profile selects generation 1, not the newest (2): rolled back" in drift, plan
    # What the plan's fact reads as `deploy`: both generations, the newest selected.
    command = SystemGenerations().command(PROFILE)
    seen = SystemGenerations().process(fleet.ssh("deploy@mac1", command).splitlines())
    assert [(g.number, g.current) for g in seen] == [(1, False), (2, True)], seen


def _hold_switch_lock(fleet, machine: str) -> str:
    """Hold switch-to-configuration's lock on a machine, as a running nixos-rebuild would;
    returns the holder's PID (one process: the lock dies with it)."""
    return fleet.ssh(
        machine,
        f"mkdir -p /run/nixos; setsid sh -c 'exec 9>>{SWITCH_LOCK}; flock 9; exec sleep 300' "
        "</dev/null >/dev/null 2>&1 & echo $!",
    )


def test_a_switch_already_running_is_not_rolled_back(fleet, flake):
    before = state(fleet, "web1")
    holder = _hold_switch_lock(fleet, "web1")
    try:
        fleet.wait_for("web1", f"flock -n {SWITCH_LOCK} true || echo held")
        set_host(flake, "web1", version="locked-out")
        result = fleet.deploy(flake, "--limit", "web1")
    finally:
        fleet.ssh("web1", f"kill {holder}")
    assert result.returncode != 0
    error = result.report["web1"]["error"]
    assert "another switch-to-configuration is running" in error, error
    assert "rolled back" not in error and "ROLLBACK FAILED" not in error, error
    assert state(fleet, "web1") == before  # profile, generations and running system untouched


def test_an_incompatible_init_activates_for_next_boot_and_reboots_when_needed(fleet, flake):
    """Exit 100: the profile and boot entry are set, the new system runs after a reboot."""
    before = state(fleet, "db1")
    set_host(flake, "db1", version="init", initInterfaceVersion="systemd 3")
    new = evaluate(flake, "db1")
    result = fleet.deploy(flake, "--limit", "db1", "--data", "reboot=when-needed")
    assert result.returncode == 0, result.output
    notes = result.report["db1"]["notes"]
    assert any("activated for next boot; reboot required" in note for note in notes), notes
    assert "rebooted" in result.report["db1"]["changed"]
    running, selected, kept = state(fleet, "db1")
    assert running == selected == new
    assert kept == [*before[2], before[2][-1] + 1]


def test_the_flake_is_evaluated_with_git_tracked_files_only(fleet):
    """In a git work tree, as nixos-rebuild's `nix build .#…` does: an untracked file (here
    a secret-like one) never reaches the controller's Nix store."""
    name = f"untracked-{uuid.uuid4().hex}.key"
    secret = ROOT / "example" / name
    secret.write_text("AGE-SECRET-KEY-1QQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQ\n")
    try:
        result = fleet.deploy(ROOT / "example", "--limit", "db1", deploy_file="deploy/build.py")
    finally:
        secret.unlink()
    assert result.returncode == 0, result.output
    leaked = [
        *Path("/nix/store").glob(f"*-source/{name}"),
        *Path("/nix/store").glob(f"*-source/example/{name}"),
    ]
    assert not leaked, f"an untracked file reached the store: {leaked}"


@needs_real_nix
def test_a_real_nix_darwin_evaluates_to_a_darwin_system(tmp_path):
    """Evaluated purely, as darwin-rebuild does: with --impure this (2020) nix-darwin falls back
    to builtins.currentSystem and a Mac's system quietly becomes an x86_64-linux derivation."""
    trees = real_nix(tmp_path)
    flake = tmp_path / "fleet"
    flake.mkdir()
    (flake / "flake.nix").write_text(
        "{\n"
        f'  inputs.nixpkgs.url = "path:{trees}/nixpkgs";\n'
        f'  inputs.darwin.url = "path:{trees}/nix-darwin";\n'
        '  inputs.darwin.inputs.nixpkgs.follows = "nixpkgs";\n'
        "  outputs = { self, nixpkgs, darwin }: {\n"
        "    darwinConfigurations.mac1 = darwin.lib.darwinSystem { modules = [ { } ]; };\n"
        "  };\n"
        "}\n"
    )
    subprocess.run([*NIX, "flake", "lock", str(flake)], check=True, capture_output=True)
    attributes = {"mac1": nix.configuration_attribute("darwin", "mac1", "root")}
    system = evaluate_systems(flake, attributes, {})["mac1"]
    shown = subprocess.run(
        [*NIX, "show-derivation", system.drv], check=True, capture_output=True, text=True
    )
    assert [d["system"] for d in json.loads(shown.stdout).values()] == ["x86_64-darwin"]


def test_a_mac_is_seen_back_after_a_reboot_by_its_boot_time(fleet, flake):
    """A Mac has no boot id (the darwin test machine neither): the deployer tells the reboot
    by `sysctl -n kern.boottime`, as macOS prints it."""
    assert fleet.ssh("mac1", f"{BOOT_ID} 2>/dev/null; echo $?") == "1"
    before = fleet.ssh("mac1", "sysctl -n kern.boottime")
    assert re.fullmatch(r"\{ sec = \d+, usec = \d+ \} .+", before), before
    set_host(flake, "mac1", version="rebooted")
    try:
        result = fleet.deploy(flake, "--limit", "mac1", "--data", "reboot=always")
    finally:
        set_host(flake, "mac1", version="1")
    assert result.returncode == 0, result.output
    assert "rebooted" in result.report["mac1"]["changed"], result.report["mac1"]
    assert fleet.ssh("mac1", "sysctl -n kern.boottime") != before
