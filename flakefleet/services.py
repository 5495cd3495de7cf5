"""What a NixOS switch would do to services, as `switch-to-configuration dry-activate` says it.

It writes a line per kind of action to standard error (nixpkgs' switch-to-configuration-ng,
as the Perl script before it), units sorted and joined with ", ", and only the kinds it has
units for::

    would stop the following units: old.service
    would NOT stop the following changed units: sshd.service
    would restart systemd
    would reload the following units: dbus.service
    would restart the following units: polkit.service
    would start the following units: accounts-daemon.service, old.service
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# The kinds of action, in the order a switch takes them.
ACTIONS = ("stop", "NOT stop", "reload", "restart", "start")
_UNITS = re.compile(
    r"would (stop|NOT stop|reload|restart|start) the following (?:changed )?units: (.*)"
)
_SYSTEMD = "would restart systemd"


def told(output: Iterable[str]) -> dict[str, list[str]]:
    """The units dry-activate would act on, by action; systemd's own restart is the unit
    ``systemd`` under ``restart``. Other lines (the activation's own) are ignored.

    Example: ``told(["would restart the following units: a.service, b.service"])`` is
    ``{"restart": ["a.service", "b.service"]}``.
    """
    found: dict[str, list[str]] = {}
    for line in output:
        line = line.strip()
        if line == _SYSTEMD:
            found.setdefault("restart", []).insert(0, "systemd")
        elif matched := _UNITS.fullmatch(line):
            units = [unit for unit in matched[2].split(", ") if unit]
            found.setdefault(matched[1], []).extend(units)
    return {action: found[action] for action in ACTIONS if action in found}


def describe(actions: dict[str, list[str]]) -> str:
    """One line for the plan.

    Example: ``would stop old.service; restart a.service; start b.service``.
    """
    if not actions:
        return "none would stop, reload, restart or start"
    verbs = {"NOT stop": "keep running though changed"}
    return "would " + "; ".join(
        f"{verbs.get(action, action)} {', '.join(units)}" for action, units in actions.items()
    )
