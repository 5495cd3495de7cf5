"""A machine's system on its way to the machine: evaluate it, build it, copy its closure.

Each operation compares the machine's state (read once, by ``facts.machine.Preflight``) with the
evaluated system and does nothing when the machine already has it: a machine already on its
system costs no command beyond the preflight.

Where the system is built is `build_on` (see ``flakefleet.builds``); how its closure travels:

- built here: signed with the fleet's key, then copied over SSH (only the paths the machine
  lacks), or uploaded once to a binary cache (`cache`) from which every machine fetches;
- built on a builder: the builder sends it to the machine directly;
- built on the machine: nothing to copy.
"""

from __future__ import annotations

from typing import Any

from pyinfra import host, state
from pyinfra.api import FunctionCommand, operation

from flakefleet import cache as caches
from flakefleet import nix, remote_nix
from flakefleet.models import MachineState
from flakefleet.run import Run
from flakefleet.target import Unreachable
from operations.refuse import refuse


def evaluate(machine: MachineState) -> nix.System | None:
    """The machine's system, evaluated with every other selected machine in one Nix call.

    A machine that lacks its system is marked for the run's builds and copies. On failure the
    machine is failed with the reason, and None is returned so the deploy file skips its other
    steps.
    """
    run = Run.of(state)
    try:
        system = run.builds.system(host.name)
    except nix.NixError as error:
        refuse(name="Evaluate the system", reason=str(error))
        return None
    outcome = run.outcome(host.name)
    outcome.system, outcome.derivation = system.out, system.drv
    outcome.running = machine.current_system
    if not machine.has_closure(system.out):
        run.builds.need(host.name)
    return system


@operation()
def build(system: nix.System, machine: MachineState):
    """Build the machine's system where `build_on` says, unless the machine already has it.

    Every machine of the run built in the same place is built by one command there; away from
    the controller, from the derivations evaluated here (see ``flakefleet.builds``).

    Example:

    .. code:: python

        closure.build(name="Build the system", system=target, machine=machine)
    """
    if machine.has_closure(system.out):
        host.noop(f"{host.name} already has {system.out}")
        return
    yield FunctionCommand(_build, (system,), {})


def _build(state: Any, host: Any, system: nix.System) -> bool:
    run = Run.of(state)
    try:
        run.builds.build(host.name)
    except nix.NixError as error:
        run.outcome(host.name).fail(f"build: {error}")
        return False
    if run.builds.placement(host.name).kind == "target":
        run.outcome(host.name).changed_by("built on the machine")
    return True


@operation()
def copy(system: nix.System, machine: MachineState):
    """Bring the system's closure to the machine: only the store paths it lacks travel.

    Example:

    .. code:: python

        closure.copy(name="Copy the closure", system=target, machine=machine)
    """
    if machine.has_closure(system.out):
        host.noop(f"{host.name} already has the closure of {system.out}")
        return
    fleet = Run.of(state).builds
    where = fleet.placement(host.name)
    if where.kind == "target":
        host.noop(f"{host.name} built {system.out} itself")
        return
    if where.kind == "builder":
        yield FunctionCommand(_relay, (where.builder, True), {})
        return
    cache = fleet.cache(host.name)
    if cache is not None and cache.machine:
        yield FunctionCommand(_push_then_relay, (cache,), {})
    elif cache is not None:
        yield FunctionCommand(_fetch_from_cache, (cache,), {})
    else:
        yield FunctionCommand(_copy, (system.out,), {})


def _copy(state: Any, host: Any, path: str) -> bool:
    """Sign the closure (once per batch), then copy it straight to the machine."""
    run = Run.of(state)
    fleet, target, outcome = run.builds, run.target(host.name), run.outcome(host.name)
    settings = run.settings(host.name)
    try:
        key = fleet.signing_key(host.name)
        fleet.root(host.name)
        if key is not None:
            fleet.sign(host.name, key)
        destination = target.store_url(settings.copy_protocol, compress=settings.copy_compress)
        flags = nix.copy_flags(
            substitute=settings.substitute_on_destination,
            check_sigs=key is not None,
            protocol=settings.copy_protocol,
        )
        sent = nix.copy_paths(
            [path], destination, target.ssh_options(), settings.nix_options, flags
        )
    except (nix.NixError, ValueError) as error:
        if "No space left on device" in str(error):
            outcome.fail(f"copy: {error}; {_collect_partial_paths(run, host.name)}")
        else:
            outcome.fail(f"copy: {error}")
        return False
    _copied(run, host.name, f"copied {sent} paths", sent)
    return True


def _collect_partial_paths(run: Run, name: str) -> str:
    """After a copy ran out of space: delete the partly written paths it left in the machine's
    store (they would fill it again and block the next deploy); the running system stays."""
    target = run.target(name)
    try:
        completed = target.run(remote_nix.collect_garbage_command(target), timeout=300)
    except Unreachable as error:
        return f"could not collect the partial paths ({error})"
    freed = completed.stdout.strip() or "nothing freed"
    return f"the machine's /nix is full; garbage collected ({freed}), its system is unchanged"


def _fetch_from_cache(state: Any, host: Any, cache: caches.Cache) -> bool:
    """Upload the run's closures to the cache (the first machine to get here does it for
    all), then have the machine fetch its own from the cache, as its SSH user."""
    run = Run.of(state)
    fleet, target, outcome = run.builds, run.target(host.name), run.outcome(host.name)
    server = run.cache_server(cache) if cache.serve else None
    try:
        key = fleet.signing_key(host.name)
        fleet.root(host.name)
        pushed = fleet.push(host.name, cache, key)
        if server is not None:
            server.acquire()
    except (nix.NixError, caches.CacheError) as error:
        outcome.fail(f"copy: upload to the cache failed: {error}")
        return False
    if pushed:
        outcome.note(f"uploaded {pushed} paths to the cache")
    try:
        command = remote_nix.fetch_command(
            cache.url, [fleet.system(host.name).out], target, check_sigs=key is not None
        )
        succeeded, output = target.run_over(host, command, as_root=False)
    finally:
        if server is not None:
            server.release()
    if not succeeded:
        outcome.fail(f"copy: fetch from the cache failed: {nix.copy_error(output.stderr)}")
        return False
    fetched = nix.copied_count(output.stderr)
    _copied(run, host.name, f"fetched {fetched} paths from the cache", fetched)
    return True


def _push_then_relay(state: Any, host: Any, cache: caches.Cache) -> bool:
    """Upload the run's closures once to the cache machine; it sends each machine its own."""
    run = Run.of(state)
    fleet = run.builds
    try:
        key = fleet.signing_key(host.name)
        fleet.root(host.name)
        pushed = fleet.push(host.name, cache, key)
    except nix.NixError as error:
        run.outcome(host.name).fail(f"copy: upload to {cache.machine} failed: {error}")
        return False
    if pushed:
        run.outcome(host.name).note(f"uploaded {pushed} paths to {cache.machine}")
    return _relay(state, host, cache.machine, False)


def _relay(state: Any, host: Any, source: str, sign_there: bool) -> bool:
    run = Run.of(state)
    fleet = run.builds
    try:
        sent = fleet.relay(host.name, source, fleet.signing_key(host.name), sign_there)
    except nix.NixError as error:
        run.outcome(host.name).fail(f"copy from {source}: {error}")
        return False
    _copied(run, host.name, f"{source} sent {sent} paths", sent)
    return True


def _copied(run: Run, name: str, what: str, count: int) -> None:
    """A copy changed the machine only if it sent something."""
    if count:
        run.outcome(name).changed_by(what)
    else:
        run.outcome(name).note(what)
