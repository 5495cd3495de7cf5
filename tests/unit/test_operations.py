"""Operations in pyinfra's own style: given what the facts read, these commands (or none).

Each operation's generator runs against a real pyinfra State and Host (nothing is
connected): a machine that is already where the deploy would put it costs no command beyond
the preflight, and one that is not gets exactly the steps it needs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pyinfra.api import Config, FunctionCommand, Inventory, State, StringCommand
from pyinfra.context import ctx_host, ctx_state

from flakefleet.models import Generation, Goal, MachineState, VarSrc
from flakefleet.nix import System
from flakefleet.run import Run
from flakefleet.sources import MachineSources, Ready, Source
from operations import activation, closure, generations, preflight, sources

OLD = System("/nix/store/old.drv", "/nix/store/old-system")
NEW = System("/nix/store/new.drv", "/nix/store/new-system")
D1 = "1" * 64


@contextmanager
def machine(**data: Any) -> Iterator[Run]:
    """web1 (as the fleet file describes it, with `data`) as the current pyinfra host."""
    host_data = {"ssh_hostname": "10.0.0.1", "ssh_user": "root", "machine_class": "nixos"}
    inventory = Inventory(([("web1", {**host_data, **data})], {}))
    state = State(inventory, Config())
    with ctx_state.use(state), ctx_host.use(inventory.get_host("web1")):
        yield Run.of(state)


def commands(operation: Any, **arguments: Any) -> list[Any]:
    """The commands an operation yields for the current host (none: it has nothing to do)."""
    return list(operation._inner(**arguments))


def functions(yielded: list[Any]) -> list[str]:
    return [c.function.__name__ if isinstance(c, FunctionCommand) else "shell" for c in yielded]


def on(system: System, generation_count: int = 1, **state: Any) -> MachineState:
    numbers = range(1, generation_count + 1)
    return MachineState(
        current_system=system.out,
        profile_system=system.out,
        generations=[Generation(n, "2026-11-22 03:00:00", n == generation_count) for n in numbers],
        **state,
    )


@pytest.fixture(autouse=True)
def no_exit_hook(monkeypatch):
    """A Run closes itself at exit (locks, summary): these runs have nothing to close."""
    monkeypatch.setattr("atexit.register", lambda *args, **kwargs: None)


def test_a_machine_on_its_system_costs_no_command_beyond_the_preflight():
    with machine(keep_generations=3):
        already = on(NEW)
        assert commands(closure.build, system=NEW, machine=already) == []
        assert commands(closure.copy, system=NEW, machine=already) == []
        for goal in (Goal.SWITCH, Goal.BOOT, Goal.TEST, Goal.BUILD):
            assert commands(activation.activate, system=NEW, machine=already, goal=goal) == []
        assert commands(generations.prune, system=NEW, machine=already, keep=3) == []


def test_a_machine_on_another_system_gets_a_build_a_copy_and_an_activation():
    with machine():
        behind = on(OLD)
        assert functions(commands(closure.build, system=NEW, machine=behind)) == ["_build"]
        assert functions(commands(closure.copy, system=NEW, machine=behind)) == ["_copy"]
        lock, launch = commands(activation.activate, system=NEW, machine=behind, goal=Goal.TEST)
        assert functions([lock, launch]) == ["_take_lock", "_activate"]
        switch = launch.args[0]
        assert (switch.goal, switch.system, switch.confirm_timeout) == (Goal.TEST, NEW.out, 30)
        _, launch = commands(activation.activate, system=NEW, machine=behind, goal=Goal.BOOT)
        assert launch.args[0].confirm_timeout == 0  # a boot runs nothing new: no confirmation


def test_the_first_step_with_work_takes_the_lock_and_the_release_only_frees_a_taken_one():
    """Building and copying add to the store, which any number of deploys may do; a step that
    changes what the machine runs or holds takes the deploy lock first, once a run."""
    with machine(keep_generations=1) as run:
        behind = on(OLD, generation_count=2)
        assert functions(commands(preflight.release)) == ["_released"]  # never locked
        assert functions(commands(closure.copy, system=NEW, machine=behind)) == ["_copy"]
        pruned = commands(generations.prune, system=NEW, machine=behind, keep=1)
        assert functions(pruned) == ["_take_lock", "_prune"]
        run.locks.add("web1")  # as `_take_lock` does when it runs
        assert functions(commands(generations.prune, system=NEW, machine=behind, keep=1)) == [
            "_prune"
        ]
        assert functions(commands(preflight.release)) == ["shell", "_released"]


def test_where_it_is_built_decides_how_the_closure_travels():
    with machine(build_on="target"):
        behind = on(OLD)
        # Built there (from the derivations copied there): nothing to copy afterwards.
        assert functions(commands(closure.build, system=NEW, machine=behind)) == ["_build"]
        assert commands(closure.copy, system=NEW, machine=behind) == []


def test_pruning_runs_only_past_the_limit():
    with machine():
        three = on(NEW, generation_count=3)
        assert commands(generations.prune, system=NEW, machine=three, keep=3) == []
        assert functions(commands(generations.prune, system=OLD, machine=three, keep=3)) == [
            "_take_lock",
            "_prune",
        ]
        assert commands(generations.prune, system=OLD, machine=three, keep=None) == []


def test_a_goal_the_class_lacks_fails_the_machine_without_a_remote_command():
    with machine(machine_class="darwin", ssh_user="deploy"):
        (refused,) = commands(activation.activate, system=NEW, machine=on(OLD), goal=Goal.BOOT)
        assert functions([refused]) == ["_fail"]
        assert refused.args == ("activate: darwin machines cannot 'boot' (only switch, "
                                "dry-activate, build)",)  # fmt: skip


def wanted(digest: str) -> MachineSources:
    config = Source(name="config", type="file", origin="group_data/all.py", path=Path("/repo"))
    return MachineSources(machine="web1", sources=(Ready(config, digest, Path("/repo")),))


def test_sources_in_place_cost_nothing_and_a_change_costs_a_push_and_one_install():
    in_place = VarSrc(
        exists=True, managed=True, sources={"config": D1}, live={"config": D1},
        stored=frozenset({"config"}),
    )  # fmt: skip
    with machine():
        assert commands(sources.sync, wanted=wanted(D1), var_src=in_place) == []
        changed = commands(sources.sync, wanted=wanted("2" * 64), var_src=in_place)
        assert functions(changed) == ["_take_lock", "_push", "shell", "_change"]
        install = changed[2]
        assert isinstance(install, StringCommand) and "live config" in str(install)
