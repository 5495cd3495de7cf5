"""The Nix command lines flakefleet runs on machines: a build on a target or builder, a copy
from a builder or cache machine to another machine, a fetch from a binary cache.

Each takes the `Target` it runs on, for where that machine keeps Nix; the caller runs the line
through the same target (`Target.run`, `Target.run_over`).
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from flakefleet.models import MachineClass
from flakefleet.nix import FEATURES
from flakefleet.target import Target, shell_path


def realise_command(drvs: Sequence[str], target: Target) -> str:
    """Build derivations on a builder; prints the output paths it built."""
    return shlex.join([target.nix("nix-store"), "--realise", "--keep-going", *drvs])


def copy_command(
    paths: Sequence[str], destination: str, ssh_command_options: Sequence[str],
    target: Target, flags: Sequence[str] = (),
) -> str:  # fmt: skip
    """Copy closures from `target`'s store to another store (a builder or cache machine
    sending a closure straight to a machine)."""
    argv = [target.nix(), *FEATURES, "copy", *flags, "--to", destination, *paths]
    return f"NIX_SSHOPTS={shlex.quote(' '.join(ssh_command_options))} {shlex.join(argv)}"


def fetch_command(
    source: str, paths: Sequence[str], target: Target, check_sigs: bool = True
) -> str:
    """Fetch closures from a binary cache into `target`'s store (a cache fan-out).

    Answers "not in the cache" are not remembered: the machine may have asked before the
    upload (Nix would otherwise believe them for an hour).
    """
    argv = [target.nix(), *FEATURES, "copy", "--option", "narinfo-cache-negative-ttl", "0"]
    if not check_sigs:
        argv.append("--no-check-sigs")
    return shlex.join([*argv, "--from", source, *paths])


def collect_garbage_command(target: Target) -> str:
    """Collect the machine's garbage; prints Nix's last line (what it freed)."""
    return f"{target.nix('nix-store')} --gc 2>&1 | tail -1"


def prune_command(target: Target, keep: int, profile: str | None = None) -> str:
    """Delete every generation of the machine's profile but the newest `keep` and the one the
    profile selects, write the boot entries again (NixOS lists every generation in its boot
    menu), then collect garbage.

    Not `nix-env --delete-generations +N`: it counts from the selected generation and keeps
    every newer one, so after a rollback more than `keep` would stay. (`profile`: another than
    the target's own, for tests.)
    """
    profile = profile or target.profile
    link = shell_path(profile)
    numbers = (
        f'for l in {link}-*-link; do [ -L "$l" ] || continue; n=${{l%-link}}; '
        'echo "${n##*-}"; done | grep -x "[0-9][0-9]*" | sort -rn'
    )
    selected = f"s=$(readlink {link}); s=${{s%-link}}; s=${{s##*-}}"
    delete = f"{shlex.quote(target.nix('nix-env'))} --profile {link}"
    # As the NixOS manual says after deleting generations: install the bootloader again, so
    # no boot entry names a generation whose closure the collection below deletes.
    nixos = target.machine_class is MachineClass.NIXOS
    boot = f" && {link}/bin/switch-to-configuration boot" if nixos else ""
    return (
        f'{selected}; old=$({numbers} | tail -n +{keep + 1} | grep -vx "$s"); '
        f'if [ -n "$old" ]; then {delete} --delete-generations $old{boot}; fi && '
        f"{target.nix('nix-store')} --gc"
    )
