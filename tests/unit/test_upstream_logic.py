"""Upstream behaviours checked by running flakefleet's remote commands with `sh` against
stand-ins: a profile's generation links, a Mac's `sysctl`, a container's toplevel."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from facts.nix import BOOT_ID, BOOT_IDENTITY, SystemGenerations, needs_reboot_command
from flakefleet.remote_nix import prune_command
from flakefleet.target import Target


def sh(command: str, path: Path | None = None) -> str:
    env = {**os.environ, "PATH": f"{path}:{os.environ['PATH']}"} if path else None
    completed = subprocess.run(["sh", "-c", command], capture_output=True, text=True, env=env)
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


def test_generations_are_read_from_the_profile_links(tmp_path):
    """No `nix-env --list-generations` (its lock needs write access): the links say it all."""
    profile = tmp_path / "system"
    for number in (1, 2, 10):
        (tmp_path / f"system-{number}-link").symlink_to(f"/nix/store/h{number}-nixos-system-x")
    (tmp_path / "system-profiles").mkdir()  # another profile's directory, not a generation
    profile.symlink_to("system-2-link")
    fact = SystemGenerations()
    generations = fact.process(sh(fact.command(str(profile))).splitlines())
    assert [(g.number, g.current, g.system) for g in generations] == [
        (1, False, "/nix/store/h1-nixos-system-x"),
        (2, True, "/nix/store/h2-nixos-system-x"),
        (10, False, "/nix/store/h10-nixos-system-x"),
    ]
    assert all(len(g.created) == len("2026-11-22 02:56:28") for g in generations)


def test_a_mac_is_identified_by_its_boot_time(tmp_path):
    """No /proc/sys/kernel/random/boot_id on macOS: `sysctl -n kern.boottime`, as one word."""
    sysctl = tmp_path / "sysctl"
    sysctl.write_text(
        '#!/bin/sh\n[ "$*" = "-n kern.boottime" ] || exit 1\n'
        'echo "{ sec = 1764547200, usec = 81234 } Mon Dec  1 00:00:00 2025"\n'
    )
    sysctl.chmod(0o755)
    command = BOOT_IDENTITY.replace(BOOT_ID, str(tmp_path / "no-boot-id"))
    assert sh(command, tmp_path).split() == ["1764547200.81234"]
    # The whole reboot check keeps its shape: the identity, then the verdict.
    whole = needs_reboot_command("/nonexistent/system").replace(
        BOOT_ID, str(tmp_path / "no-boot-id")
    )
    assert sh(whole, tmp_path).split() == ["1764547200.81234", "needed"]


def test_parts_missing_on_both_sides_need_no_reboot(tmp_path):
    """A container's toplevel (or nix-darwin's) has no kernel, initrd nor modules."""
    booted, new, running = tmp_path / "booted", tmp_path / "new", tmp_path / "current"
    booted.mkdir()
    new.mkdir()
    running.symlink_to(new)

    def verdict() -> str:
        command = (
            needs_reboot_command(str(new))
            .replace("/run/booted-system", str(booted))
            .replace("/run/current-system", str(running))
        )
        return sh(command).split()[-1]

    assert verdict() == "not-needed"
    (new / "kernel").write_text("6.6.1")  # the new system gains a kernel: a reboot puts it in
    assert verdict() == "needed"
    (booted / "kernel").symlink_to(new / "kernel")
    assert verdict() == "not-needed"


def test_pruning_keeps_the_newest_and_the_selected_generation(tmp_path):
    """keep_generations = 2 after a rollback to generation 2 of 5: 5 and 4 (newest) and 2
    (selected) stay; Nix's `--delete-generations +2` would keep 5, 4, 3, 2 and 1."""
    calls = tmp_path / "calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for program in ("nix-env", "nix-store"):
        (bin_dir / program).write_text(f'#!/bin/sh\necho "{program} $*" >> {calls}\n')
        (bin_dir / program).chmod(0o755)
    profile = tmp_path / "system"
    for number in (1, 2, 3, 4, 5):
        (tmp_path / f"system-{number}-link").symlink_to(f"/nix/store/h{number}-system")
    profile.symlink_to("system-2-link")
    mac = Target.from_data("mac1", {"machine_class": "darwin", "remote_nix_dir": str(bin_dir)})
    sh(prune_command(mac, 2, str(profile)))
    assert calls.read_text().splitlines() == [
        f"nix-env --profile {profile} --delete-generations 3 1",
        "nix-store --gc",
    ]


def _store_system(tmp_path: Path, name: str, switch: str) -> str:
    """A store path laid out like a system whose switch-to-configuration runs `switch`."""
    tree = tmp_path / name
    (tree / "bin").mkdir(parents=True)
    script = tree / "bin" / "switch-to-configuration"
    script.write_text(f"#!/bin/sh\n{switch}\n")
    script.chmod(0o755)
    return subprocess.run(
        ["nix-store", "--add", str(tree)], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_the_worker_undoes_only_its_profile_when_another_switch_took_the_lock(tmp_path):
    """The lock taken between the worker's check and the switch: switch-to-configuration says
    "Could not acquire lock" (exit 11). The worker puts its profile back and activates nothing
    (re-activating would fail on the same lock, and the other switch is not ours to undo)."""
    activations = tmp_path / "activations"
    previous = _store_system(tmp_path, "previous", f"echo previous >> {activations}")
    new = _store_system(
        tmp_path, "new", 'echo "Could not acquire lock" >&2; exit 11'
    )  # as switch-to-configuration-ng when another switch holds its lock
    profile = tmp_path / "profiles" / "system"
    profile.parent.mkdir()
    subprocess.run(["nix-env", "-p", str(profile), "--set", previous], check=True)
    work = tmp_path / "activation"
    work.mkdir()
    worker = Path(__file__).resolve().parents[2] / "operations" / "scripts" / "activate.sh"
    subprocess.run(
        [
            "sh",
            str(worker),
            "--dir",
            str(work),
            "--class",
            "nixos",
            "--goal",
            "switch",
            "--system",
            new,
            "--profile",
            str(profile),
            "--running",
            str(tmp_path / "current"),
            "--confirm-timeout",
            "0",
        ],
        check=False,
    )
    assert (work / "phase").read_text().strip() == "failed"
    message = (work / "message").read_text()
    assert message.startswith("another switch-to-configuration is running"), message
    assert os.path.realpath(profile) == previous
    assert sorted(p.name for p in profile.parent.glob("system-*-link")) == ["system-1-link"]
    assert not activations.exists(), "the previous system was activated again"
