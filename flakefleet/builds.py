"""One evaluation and one build for all selected machines of a run.

A deploy file runs once per machine, but Nix is fastest when asked once: the first machine to
ask for its system evaluates every selected machine that shares its flake and Nix settings, and
the first to need a build builds every machine of that batch that needs one.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flakefleet import nix


@dataclass
class _Batch:
    """Machines that share a flake and Nix settings, evaluated and built together."""

    flake: Path
    options: dict[str, str]
    attributes: dict[str, list[str]]
    systems: dict[str, nix.System] | None = None
    needed: set[str] = field(default_factory=set)
    attempted: set[str] = field(default_factory=set)
    build_log: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)


class FleetBuilds:
    """Evaluations and builds of one run, keyed by machine name."""

    def __init__(self) -> None:
        self._batches: dict[tuple[str, tuple[tuple[str, str], ...]], _Batch] = {}
        self._by_machine: dict[str, _Batch] = {}
        self._lock = threading.Lock()

    def add(self, name: str, data: Any, cwd: Path) -> None:
        """Register a machine (from its pyinfra host data) before any evaluation."""
        flake = (cwd / str(data.get("flake", "."))).resolve()
        options = {str(k): str(v) for k, v in (data.get("nix_options") or {}).items()}
        key = (str(flake), tuple(sorted(options.items())))
        with self._lock:
            if name in self._by_machine:
                return
            batch = self._batches.setdefault(key, _Batch(flake, options, {}))
            batch.attributes[name] = nix.configuration_attribute(
                data.get("machine_class", "nixos"), name, data.get("ssh_user") or "root"
            )
            self._by_machine[name] = batch

    def system(self, name: str) -> nix.System:
        """The machine's evaluated system; raises NixError if it does not evaluate."""
        batch = self._by_machine[name]
        with batch.lock:
            if batch.systems is None:
                batch.systems = nix.evaluate_systems(batch.flake, batch.attributes, batch.options)
        if name not in batch.systems:
            reason = nix.evaluation_error(batch.flake, batch.attributes[name], batch.options)
            raise nix.NixError(f"evaluation of {'.'.join(batch.attributes[name])} failed: {reason}")
        return batch.systems[name]

    def need(self, name: str) -> None:
        """Mark a machine's system as needing a build in this run."""
        self._by_machine[name].needed.add(name)

    def build(self, name: str) -> str:
        """Build the machine's system (with every needed system of its batch); returns its path."""
        batch = self._by_machine[name]
        system = self.system(name)
        with batch.lock:
            assert batch.systems is not None
            if system.drv not in batch.attempted:
                drvs = [
                    batch.systems[machine].drv
                    for machine in sorted(batch.needed | {name})
                    if machine in batch.systems
                    and batch.systems[machine].drv not in batch.attempted
                    and not Path(batch.systems[machine].out).exists()
                ]
                if drvs:
                    batch.build_log += nix.realise(drvs, batch.options)
                batch.attempted.update(drvs)
        if not Path(system.out).exists():
            raise nix.NixError(f"build failed: {nix.build_failure(batch.build_log, system.drv)}")
        return system.out


_runs: dict[int, FleetBuilds] = {}


def for_run(state: Any) -> FleetBuilds:
    """The FleetBuilds of a pyinfra run (one per State), with every active machine registered."""
    builds = _runs.get(id(state))
    if builds is None:
        builds = _runs[id(state)] = FleetBuilds()
        cwd = Path(state.cwd or ".")
        for host in state.inventory.get_active_hosts():
            builds.add(host.name, host.data, cwd)
    return builds
