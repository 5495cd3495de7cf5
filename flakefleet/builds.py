"""One evaluation, one build per place, and one upload per path for all selected machines.

A deploy file runs once per machine, but Nix is fastest when asked once: the first machine to
ask for its system starts the evaluation of every selected machine that shares its flake and
Nix settings (in chunks, by the run's workers, from the cache where nothing changed: see
`flakefleet.evaluation`), and each machine waits for its own; the first to need a build builds
every machine of that batch that is built in the same place (`build_on`); the first to copy
signs every closure of the batch, and the first to use a cache uploads every closure that goes
through it.

Where a system is built (`build_on`, per machine or group):

- ``local`` (default): on the controller, one ``nix-store --realise`` for the batch;
- ``target``: on the machine itself;
- a fleet machine's name, or an ``ssh://`` / ``ssh-ng://`` URL: on that builder, one build
  for every machine it builds for; the builder then sends each machine its closure directly.

Away from the controller, the build is of the derivations evaluated here, copied there first
(as `nixos-rebuild --build-host` and colmena's `buildOnTarget` do): the machine never
evaluates the flake, so it needs neither the flake's inputs nor credentials for them, and it
builds exactly what the controller evaluated (a configuration that embeds `self` included).
Wherever it is built, the path must be the one evaluated here, or the machine fails with both.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from flakefleet import cache as caches
from flakefleet import nix, remote_nix, signing
from flakefleet.evaluation import CACHE, Evaluation, Workers, default_workers
from flakefleet.fleet import fleet_state_name
from flakefleet.target import Target, Unreachable

if TYPE_CHECKING:
    from flakefleet.settings import MachineSettings

GCROOTS = ".flakefleet/gcroots"


def gcroot(cwd: Path, fleet: Path, machine: str) -> Path:
    """Where the controller keeps a machine's system alive: a directory per fleet file, as
    two fleets may both have a `web1` (`.flakefleet/gcroots/fleet-1a2b3c4d/web1`)."""
    return cwd / GCROOTS / fleet_state_name(fleet) / machine


@dataclass(frozen=True)
class Placement:
    """Where a machine's system is built: ``local``, ``target`` or ``builder`` (named)."""

    kind: str
    builder: str = ""  # a fleet machine's name, or an ssh:// / ssh-ng:// URL


def placement(value: Any, machines: Collection[str]) -> Placement:
    """Read a `build_on` setting.

    Example: ``placement("build1", {"build1"}) == Placement("builder", "build1")``.
    """
    value = str(value or "local")
    if value in ("local", "target"):
        return Placement(value)
    if value in machines or value.startswith(("ssh://", "ssh-ng://")):
        return Placement("builder", value)
    raise ValueError(
        f"build_on: {value!r} is not local, target, a fleet machine or an ssh:// or ssh-ng:// URL"
    )


@dataclass(frozen=True)
class Peer:
    """A machine flakefleet runs Nix commands on besides the one it deploys: a builder or a
    cache machine, reached as the fleet reaches it or, for a URL, with the user's own ssh
    settings."""

    target: Target
    protocol: str = "ssh"

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def store(self) -> str:
        """Its store, as the controller's Nix reaches it."""
        return self.target.store_url(self.protocol)

    def run(self, command: str) -> str:
        """Run a command there; its stdout, or NixError with its last words."""
        try:
            completed = self.target.run(command, timeout=3600)
        except Unreachable as error:
            raise nix.NixError(str(error)) from error
        if completed.returncode != 0:
            raise nix.NixError(f"on {self.name}: {nix.copy_error(completed.stderr)}")
        return completed.stdout


@dataclass
class _Batch:
    """Machines that share a flake and Nix settings, evaluated and built together."""

    flake: nix.Flake
    options: dict[str, str | nix.FromCommand]
    attributes: dict[str, nix.Attributes]
    cached: bool = True  # evaluations reuse what the cache has (`eval_cache`)
    evaluation: Evaluation | None = None
    systems: dict[str, nix.System] | None = None  # the evaluation's, as they arrive
    needed: set[str] = field(default_factory=set)
    attempted: set[str] = field(default_factory=set)
    build_log: str = ""
    built_on: dict[str, str] = field(default_factory=dict)  # out path -> builder that has it
    build_errors: dict[str, str] = field(default_factory=dict)  # machine -> why
    signed: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


class FleetBuilds:
    """Evaluations, builds and uploads of one run, keyed by machine name."""

    def __init__(
        self,
        cwd: Path,
        fleet_file: Path,
        targets: Mapping[str, Target],
        settings: Callable[[str], MachineSettings],
    ) -> None:
        self.cwd = cwd
        self.fleet_file = fleet_file
        self._targets = targets  # every machine, selected or not (builders may be either)
        self._settings = settings
        self._batches: dict[tuple[nix.Flake, tuple[tuple[str, Any], ...]], _Batch] = {}
        self._by_machine: dict[str, _Batch] = {}
        self._pushed: dict[caches.Cache, set[str]] = {}
        self._lock = threading.Lock()
        self.workers: Workers | None = None  # the run's evaluation workers (first machine's)

    def add(self, name: str) -> None:
        """Register a selected machine before any evaluation."""
        settings, target = self._settings(name), self._targets[name]
        flake = settings.flake_source(self.cwd)
        options = dict(settings.nix_options)
        key = (flake, tuple(sorted(options.items())))
        with self._lock:
            if name in self._by_machine:
                return
            if self.workers is None:
                chunk = settings.eval_chunk
                self.workers = Workers(settings.eval_workers or default_workers(chunk), chunk)
            batch = self._batches.setdefault(key, _Batch(flake, options, {}, settings.eval_cache))
            batch.attributes[name] = nix.configuration_attribute(
                target.machine_class, settings.flake_attribute or name, target.user
            )
            self._by_machine[name] = batch

    def peer(self, spec: str) -> Peer:
        """The builder or cache machine named by `spec`: a fleet machine, or an ssh URL."""
        if spec in self._targets:
            return Peer(self._targets[spec], self._settings(spec).copy_protocol)
        url = urlsplit(spec)
        address = url.hostname or spec
        return Peer(Target(name=address, address=address, ssh_user=url.username), url.scheme)

    def signing_key(self, name: str) -> Path | None:
        """The key the machine's closures are signed with (made on first use), or None."""
        settings = self._settings(name)
        return signing.key_for(settings.signing_key, settings.sign_closures, self.cwd)

    def placement(self, name: str) -> Placement:
        return self._settings(name).build_on

    def cache(self, name: str) -> caches.Cache | None:
        """The cache the machine's closure goes through, if any."""
        return self._settings(name).cache

    def system(self, name: str) -> nix.System:
        """The machine's evaluated system; raises NixError if it does not evaluate."""
        batch = self._by_machine[name]
        with batch.lock:
            if batch.evaluation is None:
                assert self.workers is not None
                cache = self.cwd / CACHE if batch.cached else None
                batch.evaluation = Evaluation(
                    batch.flake, batch.options, batch.attributes, self.workers, cache
                ).start()
                batch.systems = batch.evaluation.systems
        return batch.evaluation.result(name)

    def attributes(self, name: str) -> nix.Attributes:
        return self._by_machine[name].attributes[name]

    def need(self, name: str) -> None:
        """Mark a machine's system as needing a build and a copy in this run."""
        self._by_machine[name].needed.add(name)

    # -- building --------------------------------------------------------------------------

    def build(self, name: str) -> str:
        """Build the machine's system where it is placed (with every needed system of its
        batch placed there); returns its path."""
        where = self.placement(name)
        if where.kind == "builder":
            return self._build_remotely(name, where.builder, where)
        if where.kind == "target":  # a builder of its own only
            return self._build_remotely(name, name, where)
        return self._build_locally(name)

    def _build_locally(self, name: str) -> str:
        batch = self._by_machine[name]
        system = self.system(name)
        with batch.lock:
            assert batch.systems is not None
            machines = self._placed(batch, name, Placement("local"))
            drvs = [
                batch.systems[machine].drv
                for machine in machines
                if batch.systems[machine].drv not in batch.attempted
                and not Path(batch.systems[machine].out).exists()
            ]
            if drvs:
                batch.build_log += nix.realise(drvs, batch.options)
            batch.attempted.update(drvs)
            # Rooted before anything else happens: a garbage collection on the controller
            # between this build and the copy cannot take the closures away.
            for machine in machines:
                if Path(batch.systems[machine].out).exists():
                    self._root(machine, batch.systems[machine].out)
        if not Path(system.out).exists():
            raise nix.NixError(f"build failed: {nix.build_failure(batch.build_log, system.drv)}")
        return system.out

    def _build_remotely(self, name: str, builder: str, where: Placement) -> str:
        """Copy the derivations to the builder and build them there, once for every machine
        of the batch it builds for; the closures stay on the builder."""
        batch = self._by_machine[name]
        system = self.system(name)
        with batch.lock:
            assert batch.systems is not None
            machines = [
                m
                for m in self._placed(batch, name, where)
                if batch.systems[m].drv not in batch.attempted
            ]
            if machines:
                self._realise_on(self.peer(builder), batch, machines)
        if name in batch.build_errors:
            raise nix.NixError(batch.build_errors[name])
        return system.out

    def _realise_on(self, builder: Peer, batch: _Batch, machines: list[str]) -> None:
        assert batch.systems is not None
        drvs = [batch.systems[m].drv for m in machines]
        batch.attempted.update(drvs)
        try:
            nix.copy_derivations(drvs, builder.store, builder.target.ssh_options(), batch.options)
            built = set(builder.run(remote_nix.realise_command(drvs, builder.target)).split())
        except nix.NixError as error:
            for machine in machines:
                batch.build_errors[machine] = f"build on {builder.name} failed: {error}"
            return
        for machine in machines:
            out = batch.systems[machine].out
            if out in built:
                batch.built_on[out] = builder.name
            else:
                batch.build_errors[machine] = mismatch(builder.name, sorted(built), out)

    def _placed(self, batch: _Batch, name: str, where: Placement) -> list[str]:
        """The batch's machines that need a build in the same place as `name`, and it."""
        assert batch.systems is not None
        if where.kind == "target":
            return [name]
        return [
            machine
            for machine in sorted(batch.needed | {name})
            if machine in batch.systems and self.placement(machine) == where
        ]

    # -- what the controller keeps and sends -----------------------------------------------

    def root(self, name: str) -> None:
        """Keep the machine's system alive in the controller's store (.flakefleet/gcroots/)."""
        self._root(name, self.system(name).out)

    def _root(self, name: str, out: str) -> None:
        link = gcroot(self.cwd, self.fleet_file, name)
        if os.path.islink(link) and os.readlink(link) == out:
            return
        nix.add_root(link, out)

    def sign(self, name: str, key: Path) -> None:
        """Sign the closures of the machine's batch (all at once, once) with `key`."""
        batch = self._by_machine[name]
        with batch.lock:
            assert batch.systems is not None
            outs = sorted(
                {batch.systems[m].out for m in batch.needed | {name} if m in batch.systems}
                - batch.signed
            )
            outs = [out for out in outs if Path(out).exists()]
            if outs:
                nix.sign_paths(outs, str(key))
                batch.signed.update(outs)

    def push(self, name: str, cache: caches.Cache, key: Path | None) -> int:
        """Upload the machine's closure to the cache, with every other closure of the run that
        goes through it, all in one copy; returns how many paths this call uploaded."""
        with self._lock:
            pushed = self._pushed.setdefault(cache, set())
            if self.system(name).out in pushed:
                return 0
            outs = sorted(
                {
                    self.system(m).out
                    for m in self._users_of(cache) | {name}
                    if Path(self.system(m).out).exists()
                }
                - pushed
            )
            if key is not None:
                for machine in self._users_of(cache) | {name}:
                    self.sign(machine, key)
            if cache.machine:
                holder = self.peer(cache.machine)
                store, options = holder.store, holder.target.ssh_options()
            else:
                store, options = cache.store, []
            sent = nix.copy_paths(outs, store, options, self._by_machine[name].options)
            pushed.update(outs)
            return sent

    def _users_of(self, cache: caches.Cache) -> set[str]:
        """The machines of this run that need a copy through `cache`."""
        return {
            machine
            for machine, batch in self._by_machine.items()
            if machine in batch.needed
            and self.placement(machine).kind == "local"
            and self.cache(machine) == cache
            and self._evaluated(machine)
        }

    def _evaluated(self, name: str) -> bool:
        systems = self._by_machine[name].systems
        return systems is not None and name in systems

    def relay(self, name: str, source: str, key: Path | None, sign_there: bool = False) -> int:
        """Have `source` (the builder or cache machine holding the closure) send it to the
        machine directly; the controller only asks. Returns how many paths were sent.

        `sign_there`: sign the closure in the holder's store first (a builder's own builds);
        only the signatures travel, computed here with the fleet's key.
        """
        holder = self.peer(source)
        out = self.system(name).out
        if key is not None and sign_there:
            nix.sign_paths(
                [out], str(key), holder.target.store_url("ssh-ng"), holder.target.ssh_options()
            )
        destination, settings = self._targets[name], self._settings(name)
        command = remote_nix.copy_command(
            [out],
            destination.store_url(settings.copy_protocol, compress=settings.copy_compress),
            destination.relay_options(),
            holder.target,
            nix.copy_flags(check_sigs=key is not None),
        )
        return nix.copied_count(holder_log(holder, command))


def holder_log(holder: Peer, command: str) -> str:
    """Run a copy on the holder; Nix reports what it copied on stderr, so keep both."""
    return holder.run(f"{{ {command}; }} 2>&1")


def mismatch(where: str, built: list[str], evaluated: str) -> str:
    """Why a machine stops when the path built elsewhere is not the one evaluated here."""
    got = ", ".join(built) or "nothing"
    return f"build on {where} gave {got}, but the flake evaluates to {evaluated} here"
