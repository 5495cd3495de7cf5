"""Facts about a machine's Nix and its system: current, booted, generations, Nix version.

Each fact is one small shell command; `facts.machine.MachineState` runs them all in one round
trip, which is what a deploy uses.
"""

from __future__ import annotations

import re
import time

from pyinfra.api import FactBase

from flakefleet.models import BOOTED_SYSTEM, RUNNING_SYSTEM, SYSTEM_PROFILE, Generation
from flakefleet.target import shell_path

BOOT_ID = "/proc/sys/kernel/random/boot_id"
# What identifies the current boot: Linux's boot id; a Mac has none, so its boot time
# (`sysctl -n kern.boottime`: "{ sec = 1700000000, usec = 123 } Tue Nov 14 ...") as one word.
BOOT_IDENTITY = (
    f"cat {BOOT_ID} 2>/dev/null || sysctl -n kern.boottime | "
    r"sed -n 's/^{ *sec = \([0-9]*\), *usec = \([0-9]*\) *}.*/\1.\2/p'"
)
# Parts of a system that only a reboot puts in place.
BOOT_PARTS = ("kernel", "initrd", "kernel-modules")


def needs_reboot_command(system: str) -> str:
    """Print the boot identity, then `needed` or `not-needed` for the new system.

    A part missing on both sides is no change (a container's toplevel has no kernel, initrd
    nor modules; nor has nix-darwin's). The running system is compared for every goal: a
    switch whose init was incompatible (exit 100) still runs the old one until a reboot.
    """
    differs = " || ".join(
        f"part_differs {BOOTED_SYSTEM}/{part} {system}/{part}" for part in BOOT_PARTS
    )
    function = (
        'part_differs() { { [ -e "$1" ] || [ -e "$2" ]; } && '
        '[ "$(readlink -f "$1")" != "$(readlink -f "$2")" ]; }'
    )
    running = f'[ "$(readlink -f {RUNNING_SYSTEM})" != {system} ]'
    return (
        f"{BOOT_IDENTITY}; {function}; "
        f"if {running} || {differs}; then echo needed; else echo not-needed; fi"
    )


class CurrentSystem(FactBase[str | None]):
    """The store path the machine runs now (`/run/current-system`), or None.

    A home-manager machine has no system: pass its profile as `link`.

    Example output: ``/nix/store/60nw...-nixos-system-web1-1``
    """

    def command(self, link: str = RUNNING_SYSTEM) -> str:
        # readlink -f alone prints a link that does not exist as if it did
        link = shell_path(link)
        return f"if [ -e {link} ]; then readlink -f {link}; fi"

    def process(self, output: list[str]) -> str | None:
        return output[0].strip() or None if output else None


class BootedSystem(CurrentSystem):
    """The store path the machine booted (`/run/booted-system`), or None."""

    def command(self) -> str:
        return f"readlink {BOOTED_SYSTEM} || true"


class SystemProfile(CurrentSystem):
    """The store path a profile selects (the system profile: what the next boot runs)."""

    def command(self, profile: str = SYSTEM_PROFILE) -> str:
        return CurrentSystem().command(profile)


class SystemGenerations(FactBase[list[Generation]]):
    """The system profile's generations, oldest first, with the system each one links to.

    Read from the profile's `<profile>-<N>-link` links (their targets and times), as
    nixos-rebuild-ng lists generations: `nix-env --list-generations` takes the profile's lock,
    which needs write access to its directory, so it fails for a non-root SSH user (the plan).

    Example output (generation, link time, target; then the link the profile names)::

        generation 1 1795830988 /nix/store/60nw...-nixos-system-web1-1
        generation 2 1795831802 /nix/store/3b0i...-nixos-system-web1-2
        current system-2-link
    """

    @staticmethod
    def default() -> list[Generation]:
        return []

    def command(self, profile: str = SYSTEM_PROFILE) -> str:
        # The link's own time (stat without -L), GNU stat or BSD stat (macOS).
        profile = shell_path(profile)
        return (
            f'for l in {profile}-*-link; do [ -L "$l" ] || continue; n=${{l%-link}}; '
            'printf "generation %s %s %s\\n" "${n##*-}" '
            '"$(stat -c %Y "$l" 2>/dev/null || stat -f %m "$l")" "$(readlink "$l")"; done; '
            f'printf "current %s\\n" "$(readlink {profile} 2>/dev/null)"'
        )

    def process(self, output: list[str]) -> list[Generation]:
        current = next((line.split()[1:] for line in output if line.startswith("current ")), [])
        generations = []
        for line in output:
            match = re.match(r"generation (\d+) (\d+) (\S+)$", line.strip())
            if match:
                number = int(match.group(1))
                created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(int(match.group(2))))
                selected = bool(current) and current[0].endswith(f"-{number}-link")
                generations.append(Generation(number, created, selected, match.group(3)))
        if generations:
            return sorted(generations, key=lambda generation: generation.number)
        return self._from_nix_env(output)

    @staticmethod
    def _from_nix_env(output: list[str]) -> list[Generation]:
        """`nix-env --list-generations` lines, with `link NAME TARGET` lines for the systems."""
        systems = {}
        for line in output:
            match = re.match(r"link \S+-(\d+)-link (\S+)", line)
            if match:
                systems[int(match.group(1))] = match.group(2)
        generations = []
        for line in output:
            match = re.match(r"\s*(\d+)\s+(\S+ \S+)\s*(\(current\))?", line)
            if match:
                number = int(match.group(1))
                generations.append(
                    Generation(number, match.group(2), bool(match.group(3)), systems.get(number))
                )
        return generations
