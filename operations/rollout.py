"""A rollout in waves on pyinfra's own ordering (see ``flakefleet.rollout`` for the waves):
each wave's steps run on its machines after the previous wave's, and a machine of a later
wave is activated only if the waves before it did not fail beyond `max_failures`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from pyinfra import host
from pyinfra.api import FunctionCommand, operation

from flakefleet.run import Run


def in_waves(waves: Sequence[Sequence[str]], steps: Callable[[int], None], index: int = 0) -> None:
    """Call the deploy file's `steps` for this machine's wave (given its number), after a
    `start_wave` for every wave but the first.

    Why it works: pyinfra orders operations by a graph made of each machine's own sequence of
    operations (ties broken by the deploy file's line numbers), and runs each operation on
    all its machines before the next. Every machine calls every wave's `start_wave`, at one
    call site per wave (the recursion's depth), so each machine's sequence links one wave to
    the next: wave 2's start comes after wave 1's last step on wave 1's machines, and wave
    2's steps after its start. A loop, or steps for a machine's own wave only, would not link
    them: pyinfra would run every wave's first step together.
    """
    if index >= len(waves):
        return
    if index > 0:
        start_wave(name=f"Rollout wave {index + 1}", index=index, wave=waves[index])
    if host.name in waves[index]:
        steps(index)
    in_waves(waves, steps, index + 1)


@operation(is_idempotent=False)
def start_wave(index: int, wave: Sequence[str]):
    """Go on with wave `index` (0-based) on its machines, or leave each of them untouched,
    skipped, when the rollout stopped after an earlier wave. Nothing for other machines."""
    if host.name not in wave:
        host.noop(f"{host.name} is not in wave {index + 1}")
        return
    yield FunctionCommand(_start, (index,), {})


def _start(state: Any, host: Any, index: int) -> bool:
    run = Run.of(state)
    stopped = run.wave_stopped(index)
    if stopped:
        run.outcome(host.name).skip(stopped)
        return False
    return True
