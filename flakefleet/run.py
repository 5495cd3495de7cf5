"""One deploy run: what it knows about its machines, in one object, closed once at exit.

pyinfra runs a deploy file once per machine (each in its own greenlet) and operations' commands
later; all of them find the same `Run` with `Run.of(state)`. It holds how each machine is
reached (`Target`) and its checked settings, the run's builds, sources, keys and sudo passwords,
the locks it holds, the activations waiting for confirmation, the smoke-check verdicts, the
cache servers it started, every machine's outcome, and whether the rollout stopped. When the
process exits it is closed once: servers stopped, locks released, summary printed.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from pyinfra.api import FunctionCommand

from flakefleet import cache as caches
from flakefleet import lock, nix, prefetch, records, rollout, sudo, worker
from flakefleet.builds import FleetBuilds
from flakefleet.fleet import REPOSITORY_KEY, Fleet, fleet_file, load_fleet
from flakefleet.identity import Identities
from flakefleet.report import Outcome, Report
from flakefleet.settings import MachineSettings, selected_problems
from flakefleet.target import Target, Unreachable
from flakefleet.worker import Activation, Phase

if TYPE_CHECKING:
    from flakefleet.keys import KeysInvalid, RunKeys
    from flakefleet.sources import RunSources, SourcesInvalid

ATTRIBUTE = "flakefleet_run"  # where a State keeps its Run


class Run:
    """What one pyinfra run (one State) knows about its machines."""

    def __init__(self, state: Any) -> None:
        self.state = state
        # Relative paths in group data and --data are the repository's (where inventory.py
        # and group_data/ are), wherever pyinfra runs from; without it, pyinfra's directory.
        repositories = {host.data.get(REPOSITORY_KEY) for host in state.inventory} - {None}
        self.cwd = Path(repositories.pop() if len(repositories) == 1 else state.cwd or ".")
        self.fleet_file = fleet_file()
        self.check_records = self.cwd / prefetch.records(self.fleet_file)  # the smoke checks'
        self.deployer = lock.Holder.this_process()
        self.id = uuid.uuid4().hex[:12]  # names what this run leaves on machines
        self.started = time.time()
        self.report = Report()
        self.identities = Identities(self.cwd, self.fleet_file)  # which machine is which
        self.passwords = sudo.Passwords()
        self.targets = {
            host.name: Target.from_data(host.name, host.data, self.passwords)
            for host in state.inventory
        }
        self.locks: set[str] = set()  # machines whose deploy lock this run holds
        # Machines whose lock was free at the preflight, with its serial then: the first step
        # with work there takes the lock if nobody took it since (operations.preflight).
        self.unlocked: dict[str, str] = {}
        self.launched: dict[str, Activation] = {}  # activations not yet over, as far as we know
        self.pending: dict[str, Activation] = {}  # activations awaiting their confirmation
        self.finished: set[str] = set()  # machines whose deploy file ran to its end
        self.awaiting_reboot: set[str] = set()  # activated for the next boot only (exit 100)
        self.interrupted = False
        self.stopped: list[str] = []  # why the rollout stopped (on_check_failure = stop)
        self.verdicts: dict[tuple[str, str], Any] = {}  # (health gate, machine) -> Verdict
        self.sources: RunSources | SourcesInvalid | None = None  # checked at the first use
        self.keys: RunKeys | KeysInvalid | None = None  # checked and read at the first use
        self.recipient_problems: list[str] | None = None  # host keys unlike the recipients file's
        self.build_slots = threading.BoundedSemaphore(os.cpu_count() or 2)  # local builds
        self.lock = threading.RLock()
        self._settings: dict[str, MachineSettings] = {}
        self._problems: dict[bool, tuple[list[str], dict[str, str]]] = {}
        self._builds: FleetBuilds | None = None
        self._servers: dict[caches.Cache, caches.Server] = {}
        self._revisions: dict[Path, str] = {}
        self._flake_problems: dict[Path, str] | None = None
        self._waves: list[list[str]] | None = None
        self._updated = False  # deploy/update.py updated the lock files
        self._judged: set[int] = set()  # waves whose failures were counted
        self._stopping = False
        atexit.register(self.close)
        with contextlib.suppress(ValueError):  # only the main thread may; greenlets are in it
            signal.signal(signal.SIGINT, self._interrupt)

    @classmethod
    def of(cls, state: Any) -> Run:
        """The run of a pyinfra State (deploy files see a proxy of it, commands the State)."""
        run = getattr(state, ATTRIBUTE, None)
        if run is None:
            run = cls(state)
            setattr(state, ATTRIBUTE, run)
        return run

    # -- machines ---------------------------------------------------------------------------

    def target(self, name: str) -> Target:
        return self.targets[name]

    def outcome(self, name: str) -> Outcome:
        return self.report(name)

    def settings(self, name: str, *, keep: bool = True) -> MachineSettings:
        """A machine's checked settings (`check_settings` ran first for selected machines).

        `keep=False` for another machine's, read from a run-wide check at the first machine's
        call: its deploy file has not run yet, so its data lacks what that file adds
        (`local.include(..., data={"goal": "boot"})`), and must not be kept.
        """
        with self.lock:
            if name in self._settings:
                return self._settings[name]
            data = self.state.inventory.get_host(name).data.dict()
            fleet = [host.name for host in self.state.inventory]
            found = MachineSettings.from_data(data, fleet, self.cwd)
            if keep:
                self._settings[name] = found
            return found

    def check_settings(self, locks_too: bool = True) -> None:
        """Check every selected machine's settings, once per run (at the first machine's
        call); bad ones stop the run with one line each, before any machine is contacted.
        `locks_too`: their flakes' lock files too (see `update_inputs`)."""
        with self.lock:
            if locks_too not in self._problems:
                found = selected_problems(self.state, str(self.fleet_file), locks_too)
                self._problems[locks_too] = found
        lines, reasons = self._problems[locks_too]
        if lines:
            self.stop(lines, reasons, "not deployed: bad settings stopped the run")
        self._check_flakes()

    def update_inputs(self) -> None:
        """deploy/update.py: update the lock file of each selected machine's flake, once per
        run and before anything is evaluated, and commit it when `update_commit` says so.
        What changed is printed; a failure stops the run before any machine is contacted."""
        with self.lock:
            if self._updated:
                return
            self._updated = True
            flakes = {
                self.settings(host.name, keep=False).flake_source(self.cwd): self.settings(
                    host.name, keep=False
                )
                for host in self.state.inventory.get_active_hosts()
            }
            lines = []
            for flake, settings in sorted(flakes.items(), key=lambda item: str(item[0].path)):
                try:
                    said = nix.update_inputs(flake, settings.update_inputs)
                except nix.NixError as error:
                    self.stop([str(error)], {}, "not deployed: the inputs could not be updated")
                lines += [f"updated {flake.path}/flake.lock", *(f"  {line}" for line in said)]
                commit = nix.commit_lock(flake) if settings.update_commit else None
                if commit:
                    lines.append(f"  committed: {commit}")
            print("\n".join(f"flakefleet: {line}" for line in lines), file=sys.stderr)

    def _check_flakes(self) -> None:
        """The optional gate (`flake_check`): `nix flake check --no-build` of each flake of
        the selected machines that asks for it, once per run; a failure stops the run before
        any machine is contacted."""
        with self.lock:
            if self._flake_problems is None:
                wanted = {
                    self.settings(host.name, keep=False).flake_source(self.cwd)
                    for host in self.state.inventory.get_active_hosts()
                    if self.settings(host.name, keep=False).flake_check
                }
                self._flake_problems = {
                    flake.path: problem
                    for flake in sorted(wanted, key=lambda flake: str(flake.path))
                    if (problem := nix.flake_check(flake)) is not None
                }
        if self._flake_problems:
            lines = [f"flake check of {f}: {p}" for f, p in self._flake_problems.items()]
            self.stop(lines, {}, "not deployed: the flake check failed")

    @functools.cached_property
    def fleet(self) -> Fleet:
        """The fleet file, read once a run."""
        return load_fleet(self.fleet_file)

    def waves(self) -> list[list[str]]:
        """The selected machines in the rollout's waves (`flakefleet.rollout`), decided once;
        machines must share one `rollout` setting, or the run stops."""
        with self.lock:
            if self._waves is None:
                # In the fleet file's order (pyinfra's is the order machines connected).
                active = {each.name: each for each in self.state.inventory.get_active_hosts()}
                order = [m.name for m in self.fleet.machines if m.name in active]
                hosts = [active[name] for name in [*order, *sorted(set(active) - set(order))]]
                plans = {self.settings(each.name, keep=False).rollout: each.name for each in hosts}
                if len(plans) > 1:
                    names = " and ".join(sorted(plans.values()))
                    line = (
                        f"setting 'rollout': the selected machines must share one ({names} "
                        "differ); set it in group_data/all.py or with --data"
                    )
                    self.stop([line], {}, "not deployed: machines differ in their rollout")
                groups: dict[str, set[str]] = {}
                for each in hosts:
                    for group in each.groups:
                        groups.setdefault(group, set()).add(each.name)
                plan = next(iter(plans), rollout.Rollout())
                self._waves = rollout.waves(plan, [each.name for each in hosts], groups)
            return self._waves

    def wave_stopped(self, index: int) -> str | None:
        """Why wave `index` (0-based) must not start, if the rollout stopped: counted once,
        when the wave before it is over (pyinfra runs each wave's steps after the last's)."""
        with self.lock:
            before = index - 1
            if before >= 0 and before not in self._judged:
                self._judged.add(before)
                wave = self.waves()[before]
                failed = [name for name in wave if self.outcome(name).error]
                plan = self.settings(wave[0], keep=False).rollout if wave else rollout.Rollout()
                if len(failed) > rollout.allowed_failures(plan, len(wave)):
                    self.stopped.append(
                        f"rollout stopped after wave {index}: {len(failed)} of {len(wave)} "
                        f"failed ({', '.join(failed)})"
                    )
            return self.stopped[0] if self.stopped else None

    @property
    def builds(self) -> FleetBuilds:
        """The run's evaluations, builds and uploads, with every selected machine in them."""
        with self.lock:
            if self._builds is None:
                self._builds = FleetBuilds(self.cwd, self.fleet_file, self.targets, self.settings)
                for host in self.state.inventory.get_active_hosts():
                    self._builds.add(host.name)
            return self._builds

    def cache_server(self, cache: caches.Cache) -> caches.Server:
        """The one HTTP server of a served cache in this run."""
        with self.lock:
            return self._servers.setdefault(cache, caches.Server(cache))

    # -- ending -----------------------------------------------------------------------------

    def _interrupt(self, signum: int, frame: Any) -> None:
        """Ctrl-C: stop, and exit non-zero (pyinfra's own handler exits 0). What is in flight on
        machines is settled when the run closes."""
        self.interrupted = True
        print("\nflakefleet: interrupted; stopping what is in flight", file=sys.stderr)
        raise SystemExit(130)

    def stop(self, lines: list[str], reasons: dict[str, str], others: str) -> NoReturn:
        """End the run on bad input, before it touches any machine: each machine is failed
        with its reason (the rest with `others`), and pyinfra exits with one line per problem.

        Only the first caller raises at once. The other machines' deploy files, still running
        in their greenlets, would run on while the interpreter shuts down: they wait here.
        """
        with self.lock:
            first, self._stopping = not self._stopping, True
        if not first:
            threading.Event().wait(timeout=60)  # never set: the run ends meanwhile
            raise SystemExit(1)
        for host in self.state.inventory.get_active_hosts():  # the summary, if any, stays true
            self.outcome(host.name).fail(reasons.get(host.name, others))
        raise SystemExit("\n".join(f"flakefleet: {line}" for line in lines))

    def close(self) -> None:
        """At exit, however the run ended: stop the cache servers, release the locks this run
        still holds (over new connections: pyinfra may have skipped a machine's release),
        print the summary."""
        for server in self._servers.values():
            server.stop()
        if self.interrupted:
            self._settle_interrupted()
        for name in sorted(self.locks):
            try:
                self.target(name).run(
                    lock.release_command(self.target(name).state_dir, self.deployer), timeout=30
                )
            except Unreachable:
                self.outcome(name).note(
                    "its deploy lock is still held (unreachable); the next deploy from this "
                    "controller takes it over"
                )
        for name, outcome in self.report.outcomes.items():
            tally = self.target(name).tally
            outcome.ssh_logins, outcome.commands = tally.logins, tally.commands
            outcome.check_commands = tally.checks
        addresses = {name: f"{t.address}:{t.port or 22}" for name, t in self.targets.items()}
        self.report.print(self.state, addresses)
        if self.state.is_executing and self.report.outcomes:
            self._record()

    def _record(self) -> None:
        """Append this run's line per machine to the controller's run records."""
        try:
            records.write_run(self.cwd / records.RUNS, self.id, self.started, self.report.as_dict())
        except OSError as error:
            print(f"flakefleet: could not write the run's record: {error}", file=sys.stderr)

    def record_base(self, name: str) -> str:
        """The deployer's fields of the machine's deploy record (who, which revision)."""
        flake = (self.cwd / self.settings(name).flake).resolve()  # as FleetBuilds has it
        with self.lock:
            if flake not in self._revisions:
                self._revisions[flake] = records.deployer_fields(self.id, flake)
            return self._revisions[flake]

    def _settle_interrupted(self) -> None:
        """After Ctrl-C: every activation still in flight is rolled back (nothing confirmed it)
        before the lock is released, and every machine the run had not finished is failed as
        interrupted, saying what it runs now. A worker that does not finish in time keeps the
        machine locked (nobody else may deploy over it), and the summary says so."""
        for name, activation in sorted(self.launched.items()):
            target = self.target(name)
            answer = worker.abort(target, activation, "the deploy was stopped during activation")
            if answer[0] in (*worker.BUSY, worker.Unanswered.UNREACHABLE):
                self.locks.discard(name)  # keep it: the worker still owns the machine
                self.outcome(name).fail(
                    f"interrupted during activation; {worker.explain(target, answer)}; "
                    "the deploy lock is kept until it is over"
                )
            elif answer[0] is Phase.SUCCEEDED:
                self.outcome(name).fail("interrupted after activation; it runs the new system")
            else:
                self.outcome(name).fail(f"interrupted: {worker.explain(target, answer)}")
        for host in self.state.inventory.get_active_hosts():
            outcome = self.outcome(host.name)
            if host.name in self.finished or outcome.error:
                continue
            outcome.fail(f"interrupted before the deploy finished; {self._running(host.name)}")

    def _running(self, name: str) -> str:
        try:
            return f"it runs {worker.systems(self.target(name))[0]}"
        except (Unreachable, ValueError):
            return "what it runs could not be read"


# -- commands that record an outcome when pyinfra runs them ------------------------------------


def fail(reason: str) -> FunctionCommand:
    """A command that fails the machine with a reason; its later steps are skipped."""
    return FunctionCommand(_fail, (reason,), {})


def fails(command: Any) -> bool:
    """Whether a command is one `fail` made."""
    return isinstance(command, FunctionCommand) and command.function is _fail


def change(what: str) -> FunctionCommand:
    """A command that records, when it runs, that a step changed the machine."""
    return FunctionCommand(_change, (what,), {})


def _fail(state: Any, host: Any, reason: str) -> bool:
    Run.of(state).outcome(host.name).fail(reason)
    return False


def _change(state: Any, host: Any, what: str) -> bool:
    Run.of(state).outcome(host.name).changed_by(what)
    return True
