"""A machine's system on its way to the machine: evaluate it, build it, copy its closure.

Each operation compares the machine's state (read once, by ``facts.machine.Machine``) with the
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
from pyinfra.api import FunctionCommand, StringCommand, operation

from facts.machine import MachineState
from facts.sources import SOURCES_ROOT
from flakefleet import builds, nix, report
from flakefleet import cache as caches
from flakefleet.remote import Unreachable, run_on
from flakefleet.ssh import ssh_destination, ssh_options

# The source the sources step keeps the flake in on every machine (krops' layout).
FLAKE_SOURCE = "config"


def has_closure(machine: MachineState, system: str) -> bool:
    """Whether the system's closure is surely on the machine (it runs or boots it)."""
    return system in (machine.current_system, machine.profile_system)


def evaluate(machine: MachineState) -> nix.System | None:
    """The machine's system, evaluated with every other selected machine in one Nix call.

    A machine that lacks its system is marked for the run's builds and copies. On failure the
    machine gets an operation that fails it with the reason, and None is returned so the
    deploy file skips its other steps.
    """
    fleet = builds.for_run(state)
    try:
        system = fleet.system(host.name)
    except nix.NixError as error:
        _fail(name="Evaluate the system", reason=str(error))
        return None
    report.outcome(host.name).system = system.out
    if not has_closure(machine, system.out):
        fleet.need(host.name)
    return system


@operation(is_idempotent=False)
def _fail(reason: str):
    yield report.stop(reason)


@operation()
def build(system: nix.System, machine: MachineState):
    """Build the machine's system where `build_on` says, unless the machine already has it.

    Every machine of the run built in the same place is built by one command there; a
    machine that builds its own system does so from /var/src/config.

    Example:

    .. code:: python

        closure.build(name="Build the system", system=target, machine=machine)
    """
    if has_closure(machine, system.out):
        host.noop(f"{host.name} already has {system.out}")
        return
    if builds.for_run(state).placement(host.name).kind == "target":
        # /var/src, or the SSH user's own sources directory when it is not root
        flake = f"{getattr(machine.var_src, 'root', SOURCES_ROOT)}/{FLAKE_SOURCE}"
        yield FunctionCommand(_build_on_target, (system, flake), {})
    else:
        yield FunctionCommand(_build, (system,), {})


def _build(state: Any, host: Any, system: nix.System) -> bool:
    try:
        builds.for_run(state).build(host.name)
    except nix.NixError as error:
        report.failed(host.name, f"build: {error}")
        return False
    return True


def _build_on_target(state: Any, host: Any, system: nix.System, flake: str) -> bool:
    """Build on the machine, as its SSH user, over pyinfra's connection, from the flake the
    sources step synced there; the path it built must be the one evaluated here."""
    fleet = builds.for_run(state)
    command = nix.remote_build_command(
        flake, host.name, fleet.attributes(host.name), host.data.get("remote_nix_dir")
    )
    succeeded, output = host.run_shell_command(StringCommand(command))
    if not succeeded:
        reason = nix.copy_error(output.stderr)
        report.failed(host.name, f"build on {host.name} failed: {reason}")
        return False
    try:
        built = nix.built_path(output.stdout)
    except nix.NixError as error:
        report.failed(host.name, f"build on {host.name}: {error}")
        return False
    if built != system.out:
        report.failed(host.name, builds.mismatch(host.name, [built], system.out))
        return False
    report.changed(host.name, "built on the machine")
    return True


@operation()
def copy(system: nix.System, machine: MachineState):
    """Bring the system's closure to the machine: only the store paths it lacks travel.

    Example:

    .. code:: python

        closure.copy(name="Copy the closure", system=target, machine=machine)
    """
    if has_closure(machine, system.out):
        host.noop(f"{host.name} already has the closure of {system.out}")
        return
    fleet = builds.for_run(state)
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
    fleet = builds.for_run(state)
    protocol = str(host.data.get("copy_protocol") or "ssh")
    try:
        key = builds.signing_key(host.data, fleet.cwd)
        fleet.root(host.name)
        if key is not None:
            fleet.sign(host.name, key)
        destination = nix.store_url(
            protocol,
            ssh_destination(host.data, host.name),
            compress=bool(host.data.get("copy_compress")),
            nix_dir=host.data.get("remote_nix_dir"),
        )
        flags = nix.copy_flags(
            substitute=bool(host.data.get("substitute_on_destination")),
            check_sigs=key is not None,
            protocol=protocol,
        )
        sent = nix.copy_paths(
            [path], destination, ssh_options(host.data), _options(host.data), flags
        )
    except (nix.NixError, ValueError) as error:
        if "No space left on device" in str(error):
            report.failed(host.name, f"copy: {error}; {_collect_partial_paths(host)}")
        else:
            report.failed(host.name, f"copy: {error}")
        return False
    _copied(host.name, f"copied {sent} paths", sent)
    return True


def _collect_partial_paths(host: Any) -> str:
    """After a copy ran out of space: delete the partly written paths it left in the machine's
    store (they would fill it again and block the next deploy); the running system stays."""
    try:
        completed = run_on(host.data, host.name, "nix-store --gc 2>&1 | tail -1", timeout=300)
    except Unreachable as error:
        return f"could not collect the partial paths ({error})"
    freed = completed.stdout.strip() or "nothing freed"
    return f"the machine's /nix is full; garbage collected ({freed}), its system is unchanged"


def _fetch_from_cache(state: Any, host: Any, cache: caches.Cache) -> bool:
    """Upload the run's closures to the cache (the first machine to get here does it for
    all), then have the machine fetch its own from the cache, as its SSH user."""
    fleet = builds.for_run(state)
    server = caches.server(cache) if cache.serve else None
    try:
        key = builds.signing_key(host.data, fleet.cwd)
        fleet.root(host.name)
        pushed = fleet.push(host.name, cache, key)
        if server is not None:
            server.acquire()
    except (nix.NixError, caches.CacheError) as error:
        report.failed(host.name, f"copy: upload to the cache failed: {error}")
        return False
    if pushed:
        report.note(host.name, f"uploaded {pushed} paths to the cache")
    try:
        command = nix.fetch_command(
            cache.url, [fleet.system(host.name).out], host.data.get("remote_nix_dir"),
            check_sigs=key is not None,
        )  # fmt: skip
        succeeded, output = host.run_shell_command(StringCommand(command))
    finally:
        if server is not None:
            server.release()
    if not succeeded:
        report.failed(
            host.name, f"copy: fetch from the cache failed: {nix.copy_error(output.stderr)}"
        )
        return False
    fetched = nix.copied_count(output.stderr)
    _copied(host.name, f"fetched {fetched} paths from the cache", fetched)
    return True


def _push_then_relay(state: Any, host: Any, cache: caches.Cache) -> bool:
    """Upload the run's closures once to the cache machine; it sends each machine its own."""
    fleet = builds.for_run(state)
    try:
        key = builds.signing_key(host.data, fleet.cwd)
        fleet.root(host.name)
        pushed = fleet.push(host.name, cache, key)
    except nix.NixError as error:
        report.failed(host.name, f"copy: upload to {cache.machine} failed: {error}")
        return False
    if pushed:
        report.note(host.name, f"uploaded {pushed} paths to {cache.machine}")
    return _relay(state, host, cache.machine, False)


def _relay(state: Any, host: Any, source: str, sign_there: bool) -> bool:
    fleet = builds.for_run(state)
    try:
        key = builds.signing_key(host.data, fleet.cwd)
        sent = fleet.relay(host.name, source, host.data, key, sign_there)
    except nix.NixError as error:
        report.failed(host.name, f"copy from {source}: {error}")
        return False
    _copied(host.name, f"{source} sent {sent} paths", sent)
    return True


def _copied(name: str, what: str, count: int) -> None:
    """A copy changed the machine only if it sent something."""
    if count:
        report.changed(name, what)
    else:
        report.note(name, what)


def _options(data: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in (data.get("nix_options") or {}).items()}
