"""Old generations: a machine keeps the newest `keep_generations` of its profile (and the one it
runs, whatever its age), and the store paths only older ones used are collected.

The decision is made from the preflight's generations, so a machine with nothing to prune
costs no command.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

from pyinfra import host
from pyinfra.api import FunctionCommand, operation

from facts.machine import MachineState
from flakefleet import nix, report, sudo

# Goals that add a generation to the profile.
NEW_GENERATION_GOALS = ("switch", "boot")


def generations_after(machine: MachineState, system: str, goal: str) -> int:
    """How many generations the profile will have once this deploy is done."""
    adds = goal in NEW_GENERATION_GOALS and machine.profile_system != system
    return len(machine.generations) + (1 if adds else 0)


def prune_command(
    profile: str, keep: int, nix_dir: str | None = None, bootloader: bool = False
) -> str:
    """Delete every generation but the newest `keep` and the one the profile selects, write
    the boot entries again (`bootloader`: NixOS lists every generation in its boot menu), then
    collect garbage.

    Not `nix-env --delete-generations +N`: it counts from the selected generation and keeps
    every newer one, so after a rollback more than `keep` would stay.
    """
    link = shlex.quote(profile)
    numbers = (
        f'for l in {link}-*-link; do [ -L "$l" ] || continue; n=${{l%-link}}; '
        'echo "${n##*-}"; done | grep -x "[0-9][0-9]*" | sort -rn'
    )
    selected = f"s=$(readlink {link}); s=${{s%-link}}; s=${{s##*-}}"
    delete = shlex.join([nix.remote_nix(nix_dir, "nix-env"), "--profile", profile])
    # As the NixOS manual says after deleting generations: install the bootloader again, so
    # no boot entry names a generation whose closure the collection below deletes.
    boot = f" && {link}/bin/switch-to-configuration boot" if bootloader else ""
    return (
        f'{selected}; old=$({numbers} | tail -n +{keep + 1} | grep -vx "$s"); '
        f'if [ -n "$old" ]; then {delete} --delete-generations $old{boot}; fi && '
        f"{nix.remote_nix(nix_dir, 'nix-store')} --gc"
    )


@operation()
def prune(system: nix.System, machine: MachineState, goal: str = "switch", keep: int | None = None):
    """Delete the machine's generations beyond the newest `keep` and collect garbage.

    + keep: how many generations to keep (None: keep them all)

    Example:

    .. code:: python

        generations.prune(name="Prune", system=target, machine=machine, keep=5)
    """
    if keep is None:
        host.noop("keep_generations is not set: every generation stays")
        return
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
        yield report.stop(f"keep_generations must be a number of at least 1, not {keep!r}")
        return
    count = generations_after(machine, system.out, goal)
    if count <= keep:
        host.noop(f"{host.name} has {count} generations, keeps {keep}")
        return
    machine_class = host.data.get("machine_class", "nixos")
    profile = nix.profile_path(machine_class, host.data.get("ssh_user") or "root")
    command = prune_command(
        profile, keep, host.data.get("remote_nix_dir"), bootloader=machine_class == "nixos"
    )
    yield FunctionCommand(_prune, (command,), {})


def _prune(state: Any, host: Any, command: str) -> bool:
    # The system profile belongs to root; a home-manager profile to its user.
    succeeded, output = sudo.run_as_root(host, command)
    if not succeeded:
        lines = [line for line in output.stderr_lines if line.strip()]
        report.failed(host.name, f"prune: {lines[-1] if lines else 'failed'}")
        return False
    removed = len(re.findall(r"removing (?:profile )?(?:version|generation) \d+", output.stderr))
    freed = re.search(r"(\d+ store paths deleted, .* freed)", output.stdout + output.stderr)
    report.changed(host.name, f"pruned {removed} generations")
    if freed:
        report.note(host.name, freed.group(1))
    return True
