"""Rollouts in waves: a canary first, then batches, each activated, checked and confirmed
before the next starts; too many failures in a wave stop the rollout.

    rollout = {"canary": "web1", "batch": "25%", "max_failures": 1}

`canary`: the first wave: a role or class (a pyinfra group), a glob over machine names, or a
count of machines. `batch`: how many machines each later wave has, a count or a percentage of
the selected machines (at least one). `max_failures`: how many machines of one wave may fail
(a count, or a percentage of the wave) before the rollout stops; later waves are then not
activated. Machines keep the fleet file's order. Without `rollout`, every machine is one wave.

Waves divide activation, not the work before it: every selected machine is still evaluated,
built and copied together (one evaluation, one build, one cache upload).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from typing import Any

FIELDS = ("canary", "batch", "max_failures")


@dataclass(frozen=True)
class Rollout:
    canary: str | int | None = None
    batch: str | int | None = None  # None: every machine after the canary, in one wave
    max_failures: str | int = 0


def _amount(value: Any, *, at_least: int) -> str | None:
    """The problem with a count (`at_least` or more) or a percentage ("25%"), if any."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= at_least:
        return None
    percentage = isinstance(value, str) and value.endswith("%") and value[:-1].isdigit()
    if percentage and int(value[:-1]) <= 100:
        return None
    return f"a whole number of at least {at_least}, or a percentage like '25%'"


def problem(value: Any) -> str | None:
    """What is wrong with a `rollout` setting, or None."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        return "must be a mapping with canary, batch and max_failures"
    unknown = sorted(str(key) for key in value if key not in FIELDS)
    if unknown:
        return f"unknown field {unknown[0]!r} (expected one of: {', '.join(FIELDS)})"
    canary = value.get("canary")
    named = isinstance(canary, str) and bool(canary)
    if canary is not None and not named and _amount(canary, at_least=1):
        return "canary must be a role, a class, a glob of machine names, or a count"
    if value.get("batch") is not None and (why := _amount(value["batch"], at_least=1)):
        return f"batch must be {why}"
    if why := _amount(value.get("max_failures", 0), at_least=0):
        return f"max_failures must be {why}"
    return None


def parse(value: Mapping[str, Any] | None) -> Rollout:
    """A checked `rollout` setting (see `problem`)."""
    if not value:
        return Rollout()
    return Rollout(value.get("canary"), value.get("batch"), value.get("max_failures", 0))


def _count(amount: str | int, total: int, rounding: Callable[[float], int]) -> int:
    if isinstance(amount, str):
        return rounding(total * int(amount[:-1]) / 100)
    return amount


def waves(
    rollout: Rollout, machines: Sequence[str], groups: Mapping[str, Collection[str]]
) -> list[list[str]]:
    """The selected `machines` (in the fleet file's order) in waves; `groups`: each pyinfra
    group's machines (roles and classes).

    Example: ``waves(Rollout(canary="db", batch=2), ["web1", "web2", "db1", "vpn1"],
    {"db": {"db1"}}) == [["db1"], ["web1", "web2"], ["vpn1"]]``.
    """
    canary: list[str] = []
    if isinstance(rollout.canary, int):
        canary = list(machines[: rollout.canary])
    elif isinstance(rollout.canary, str):
        chosen = groups.get(rollout.canary)
        canary = [m for m in machines if (m in chosen if chosen else fnmatch(m, rollout.canary))]
    rest = [m for m in machines if m not in canary]
    size = len(rest) if rollout.batch is None else _count(rollout.batch, len(machines), math.ceil)
    size = max(1, size)
    found = [canary] if canary else []
    found += [rest[start : start + size] for start in range(0, len(rest), size)]
    return found or [[]]


def allowed_failures(rollout: Rollout, wave_size: int) -> int:
    """How many machines of a wave of `wave_size` may fail before the rollout stops."""
    return _count(rollout.max_failures, wave_size, math.floor)
