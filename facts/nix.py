"""Facts about a machine's Nix and its system: current, booted, generations, Nix version.

Each fact is one small shell command; `facts.machine.MachineState` runs them all in one round
trip, which is what a deploy uses.
"""

from __future__ import annotations

import re

from pyinfra.api import FactBase

from flakefleet.models import BOOTED_SYSTEM, RUNNING_SYSTEM, SYSTEM_PROFILE, Generation


class CurrentSystem(FactBase[str | None]):
    """The store path the machine runs now (`/run/current-system`), or None.

    A home-manager machine has no system: pass its profile as `link`.

    Example output: ``/nix/store/60nw...-nixos-system-web1-1``
    """

    def command(self, link: str = RUNNING_SYSTEM) -> str:
        # readlink -f alone prints a link that does not exist as if it did
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

    Example output::

           1   2026-11-22 02:56:28
           2   2026-11-22 03:10:02   (current)
        link system-1-link /nix/store/60nw...-nixos-system-web1-1
        link system-2-link /nix/store/3b0i...-nixos-system-web1-2
    """

    @staticmethod
    def default() -> list[Generation]:
        return []

    def command(self, profile: str = SYSTEM_PROFILE) -> str:
        return (
            f"nix-env -p {profile} --list-generations 2>/dev/null; "
            f'for l in {profile}-*-link; do [ -L "$l" ] && '
            'printf "link %s %s\\n" "${l##*/}" "$(readlink "$l")"; done; true'
        )

    def process(self, output: list[str]) -> list[Generation]:
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


class NixVersion(FactBase[str | None]):
    """The version of the machine's `nix`, e.g. ``2.8.0``, or None without Nix."""

    def command(self) -> str:
        return "nix --version 2>/dev/null || true"

    def process(self, output: list[str]) -> str | None:
        match = re.search(r"(\d+\.\d+(?:\.\d+)?)", " ".join(output))
        return match.group(1) if match else None
