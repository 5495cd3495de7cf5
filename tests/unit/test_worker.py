"""The activation protocol: the worker script run for real with `sh` against a fake system
(switch succeeds, exits 4, exits 100, hangs), and the deployer's half of it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from flakefleet.models import Goal, MachineClass
from flakefleet.records import parse_history
from flakefleet.worker import (
    BUSY,
    Activation,
    Phase,
    Unanswered,
    WorkerDir,
    parse_answer,
    workers_command,
)

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "operations" / "scripts" / "activate.sh"


def test_the_script_writes_exactly_the_protocols_phases():
    written = set(re.findall(r"\bphase ([a-z-]+) ", SCRIPT.read_text()))
    assert written == {str(phase) for phase in Phase}


# Profile generations as Nix keeps them (`system-N-link`, and `system` linking to one), for
# systems outside the store: the real nix-env only takes store paths, and a unit test must not
# write this computer's store. The test fleet runs the real one.
NIX_ENV = """#!/bin/sh
[ "$1" = -p ] || exit 2
profile=$2 action=$3 value=${4:-}
dir=$(dirname "$profile") base=$(basename "$profile")
current=$(readlink "$profile" 2>/dev/null | sed 's/.*-\\([0-9]*\\)-link$/\\1/')
numbers() { ls "$dir" | sed -n "s/^$base-\\([0-9]*\\)-link$/\\1/p" | sort -n; }
select() { ln -sfn "$base-$1-link" "$profile.new" && mv -T "$profile.new" "$profile"; }
case $action in
  --set) n=$(( $(numbers | tail -n1) + 1 )); ln -s "$value" "$dir/$base-$n-link"; select $n ;;
  --switch-generation) [ -e "$dir/$base-$value-link" ] && select "$value" ;;
  --rollback) n=$(numbers | awk -v c="$current" '$1 < c' | tail -n1); [ -n "$n" ] && select $n ;;
  --delete-generations) [ "$value" != "$current" ] && rm "$dir/$base-$value-link" ;;
  *) exit 2 ;;
esac
"""


class Machine:
    """A fake machine in a directory: a profile, and systems whose switch-to-configuration
    does what a test says."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.profile = root / "profiles" / "system"
        self.profile.parent.mkdir(parents=True)
        self.log = root / "activations"
        self.running = root / "current-system"  # what each switch-to-configuration makes live
        self.bin = root / "bin"
        self.bin.mkdir()
        (self.bin / "nix-env").write_text(NIX_ENV)
        (self.bin / "nix-env").chmod(0o755)
        self.env = {**os.environ, "PATH": f"{self.bin}:{os.environ['PATH']}"}

    def system(self, name: str, script: str = "exit 0") -> str:
        system = self.root / name
        (system / "bin").mkdir(parents=True)
        switch = system / "bin" / "switch-to-configuration"
        switch.write_text(
            f'#!/bin/sh\necho "{name} $1" >> {self.log}\n'
            f'[ "$1" = boot ] || ln -sfn {system} {self.running}\n{script}\n'
        )
        switch.chmod(0o755)
        return str(system)

    def activation(self, system: str, goal: Goal = Goal.SWITCH, confirm: float = 0) -> Activation:
        return Activation(
            id=f"a{time.monotonic_ns()}",
            machine_class=MachineClass.NIXOS,
            goal=goal,
            system=system,
            profile=str(self.profile),
            running=str(self.running),
            confirm_timeout=confirm,
            state_dir=str(self.root / "state"),
        )

    def start(self, activation: Activation) -> subprocess.Popen[bytes]:
        Path(activation.directory.path).mkdir(parents=True)
        return subprocess.Popen(["sh", str(SCRIPT), *activation.arguments()[2:]], env=self.env)

    def run(self, activation: Activation) -> tuple[Phase | Unanswered, str]:
        self.start(activation).wait(timeout=60)
        return self.answer(activation)

    def answer(
        self, activation: Activation, busy: tuple[Phase, ...] = BUSY
    ) -> tuple[Phase | Unanswered, str]:
        """The phase once the worker leaves the `busy` ones (the deployer's wait)."""
        completed = subprocess.run(
            ["sh", "-c", activation.wait_command(busy, seconds=30)], capture_output=True, text=True
        )
        return parse_answer(completed.returncode, completed.stdout, completed.stderr)

    def selected(self) -> str:
        return str(Path(self.profile).resolve())


@pytest.fixture
def machine(tmp_path: Path) -> Machine:
    return Machine(tmp_path)


def test_a_switch_sets_the_profile_and_succeeds(machine):
    new = machine.system("new")
    assert machine.run(machine.activation(new)) == (Phase.SUCCEEDED, f"activated {new}")
    assert machine.selected() == new
    assert machine.log.read_text() == "new switch\n"


def test_failed_units_exit_4_roll_profile_and_activation_back(machine):
    old = machine.system("old")
    assert machine.run(machine.activation(old))[0] is Phase.SUCCEEDED
    new = machine.system("new", "exit 4")
    phase, message = machine.run(machine.activation(new))
    assert phase is Phase.ROLLED_BACK
    assert message == f"activation failed (exit 4); rolled back to {old}"
    assert machine.selected() == old
    assert machine.log.read_text().splitlines() == ["old switch", "new switch", "old switch"]
    assert not list(machine.profile.parent.glob("system-2-link"))  # the failed one is deleted


def test_exit_100_activates_for_the_next_boot(machine):
    # NixOS: the new init is incompatible with the running one; the profile and boot entry
    # are set and the new system runs after a reboot: nothing to roll back.
    machine.run(machine.activation(machine.system("old")))
    new = machine.system("new", "exit 100")
    phase, message = machine.run(machine.activation(new))
    assert phase is Phase.SUCCEEDED
    assert message.startswith("activated for next boot; reboot required")
    assert machine.selected() == new


def test_exit_4_with_a_boot_goal_also_rolls_back(machine):
    old = machine.system("old")
    machine.run(machine.activation(old))
    phase, message = machine.run(machine.activation(machine.system("new", "exit 4"), Goal.BOOT))
    assert (phase, message) == (
        Phase.ROLLED_BACK,
        f"activation failed (exit 4); rolled back to {old}",
    )


def test_a_first_activation_that_fails_has_nothing_to_go_back_to(machine):
    phase, message = machine.run(machine.activation(machine.system("new", "exit 4")))
    assert phase is Phase.FAILED
    assert "no previous generation to roll back to" in message


def test_confirmation_and_abort(machine):
    old = machine.system("old")
    machine.run(machine.activation(old))
    new = machine.system("new")

    confirmed = machine.activation(new, confirm=30)
    worker = machine.start(confirmed)
    assert machine.answer(confirmed, (Phase.RUNNING,))[0] is Phase.AWAITING_CONFIRMATION
    # Until confirmed, the new system only runs (`test`): the profile and the boot default
    # stay on the old one, so a power cut now boots what ran before.
    assert machine.selected() == old
    assert machine.log.read_text().splitlines()[-1] == "new test"
    subprocess.run(["sh", "-c", confirmed.confirm_command()], check=True)
    worker.wait(timeout=30)
    assert machine.answer(confirmed) == (Phase.SUCCEEDED, f"activated {new}, confirmed")
    assert machine.selected() == new
    assert machine.log.read_text().splitlines()[-1] == "new boot"  # now the boot default

    aborted = machine.activation(machine.system("newer"), confirm=30)
    worker = machine.start(aborted)
    assert machine.answer(aborted, (Phase.RUNNING,))[0] is Phase.AWAITING_CONFIRMATION
    subprocess.run(["sh", "-c", aborted.abort_command()], input=b"checks failed", check=True)
    worker.wait(timeout=30)
    assert machine.answer(aborted) == (Phase.ROLLED_BACK, f"checks failed; rolled back to {new}")
    assert machine.selected() == new
    assert machine.log.read_text().splitlines()[-2:] == ["newer test", "new test"]
    assert len(list(machine.profile.parent.glob("system-*-link"))) == 2  # none was added


def test_no_confirmation_in_time_rolls_back(machine):
    old = machine.system("old")
    machine.run(machine.activation(old))
    phase, message = machine.run(machine.activation(machine.system("new"), confirm=1))
    assert phase is Phase.ROLLED_BACK
    assert message.startswith("not confirmed within 1s") and message.endswith(f"to {old}")


def test_a_hanging_switch_keeps_the_worker_running(machine):
    activation = machine.activation(machine.system("new", "sleep 30"))
    worker = machine.start(activation)
    try:
        completed = subprocess.run(
            ["sh", "-c", activation.wait_command((Phase.RUNNING,), seconds=1)],
            capture_output=True, text=True,
        )  # fmt: skip
        assert parse_answer(completed.returncode, completed.stdout, "")[0] is Phase.RUNNING
    finally:
        worker.kill()


def _started(activation: Activation) -> None:
    deadline = time.monotonic() + 30
    while not Path(activation.directory.phase).exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_reused_pid_is_not_taken_for_the_worker(machine):
    """The wait looks at the worker with `kill -0` each tick; a PID the worker left to another
    process (or a zombie) passes that, and `alive`, once a second, tells them apart."""
    activation = machine.activation(machine.system("new", "sleep 30"))
    worker = machine.start(activation)
    _started(activation)
    worker.kill()
    worker.wait()
    other = subprocess.Popen(["sleep", "60"])  # alive, and not the worker
    try:
        Path(activation.directory.pid).write_text(f"{other.pid}\n")
        started = time.monotonic()
        assert machine.answer(activation)[0] is Unanswered.GONE
        assert time.monotonic() - started < 5  # not the 30 s the wait allows
    finally:
        other.kill()
        other.wait()


def test_the_wait_costs_the_machine_one_process_a_tick(machine, tmp_path):
    activation = machine.activation(machine.system("new", "sleep 30"))
    worker = machine.start(activation)
    wrappers, log = tmp_path / "wrappers", tmp_path / "spawned"
    wrappers.mkdir()
    for program in ("cat", "ps", "grep", "sleep"):
        real = shutil.which(program)
        (wrappers / program).write_text(f'#!/bin/sh\necho {program} >> {log}\nexec {real} "$@"\n')
        (wrappers / program).chmod(0o755)
    try:
        _started(activation)
        env = {**machine.env, "PATH": f"{wrappers}:{machine.env['PATH']}"}
        command = activation.wait_command((Phase.RUNNING,), seconds=2)  # 20 ticks, then out
        completed = subprocess.run(["sh", "-c", command], env=env, capture_output=True, text=True)
        assert parse_answer(0, completed.stdout, "")[0] is Phase.RUNNING
    finally:
        worker.kill()
    spawned = Counter(log.read_text().split())
    assert spawned["sleep"] == 20, spawned
    # `alive` twice in the 20 ticks and once more at the end; the message read at the end.
    assert spawned["ps"] <= 3 and spawned["grep"] <= 3 and spawned["cat"] <= 1, spawned


class Sources:
    """A sources root as the sync leaves it: /var/src/NAME linking into its store."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def install(self, name: str, tree: str) -> None:
        (self.root / ".flakefleet" / name / tree).mkdir(parents=True, exist_ok=True)
        link = self.root / name
        link.unlink(missing_ok=True)
        link.symlink_to(f".flakefleet/{name}/{tree}")

    def live(self) -> dict[str, str]:
        return {
            link.name: os.readlink(link).split("/")[-1]
            for link in self.root.iterdir()
            if link.is_symlink()
        }


def deploy(machine: Machine, sources: Sources, system: str, **fields) -> Activation:
    return replace(
        machine.activation(system),
        sources_root=str(sources.root),
        sources_undo=str(sources.root / ".flakefleet" / ".undo" / f"r{time.monotonic_ns()}"),
        record=str(machine.root / "lib" / "history.jsonl"),
        record_base='"run":"r1","by":"ops@laptop","revision":"abc","dirty":false',
        **fields,
    )


def test_each_activation_is_recorded_with_the_sources_its_generation_runs(machine):
    sources = Sources(machine.root / "src")
    sources.install("config", "c1")
    assert machine.run(deploy(machine, sources, machine.system("one")))[0] is Phase.SUCCEEDED
    sources.install("config", "c2")
    sources.install("app", "a2")
    assert machine.run(deploy(machine, sources, machine.system("two")))[0] is Phase.SUCCEEDED
    broken = machine.system("broken", "exit 4")
    assert machine.run(deploy(machine, sources, broken))[0] is Phase.ROLLED_BACK

    history = parse_history((machine.root / "lib" / "history.jsonl").read_text())
    assert [(e.outcome, e.generation, e.sources) for e in history] == [
        ("succeeded", 1, {"config": "c1"}),
        ("succeeded", 2, {"app": "a2", "config": "c2"}),
        ("rolled-back", None, {"app": "a2", "config": "c2"}),
    ]
    assert (history[0].by, history[0].revision, history[0].run) == ("ops@laptop", "abc", "r1")
    assert oct((machine.root / "lib" / "history.jsonl").stat().st_mode & 0o777) == "0o600"
    generations = sources.root / ".flakefleet" / ".generations"
    assert (generations / "1").read_text() == "config c1\n"


def test_a_rollback_to_a_generation_puts_back_its_sources(machine):
    sources = Sources(machine.root / "src")
    sources.install("config", "c1")
    machine.run(deploy(machine, sources, machine.system("one")))
    sources.install("config", "c2")
    sources.install("app", "a2")
    machine.run(deploy(machine, sources, machine.system("two")))

    # A rollback whose activation fails puts back the sources it had replaced.
    (machine.root / "one" / "bin" / "switch-to-configuration").write_text("#!/bin/sh\nexit 4\n")
    failing = deploy(machine, sources, str(machine.root / "one"), generation=1)
    assert machine.run(failing)[0] is Phase.ROLLED_BACK
    assert sources.live() == {"config": "c2", "app": "a2"}

    (machine.root / "one" / "bin" / "switch-to-configuration").write_text("#!/bin/sh\nexit 0\n")
    answer = machine.run(deploy(machine, sources, str(machine.root / "one"), generation=1))
    assert answer == (Phase.SUCCEEDED, f"activated {machine.root / 'one'} with the sources "
                                        "it was deployed with")  # fmt: skip
    assert sources.live() == {"config": "c1"}


def test_the_worker_refuses_a_command_line_it_does_not_know(tmp_path):
    completed = subprocess.run(
        ["sh", str(SCRIPT), "--dir", str(tmp_path), "--goal"], capture_output=True, text=True
    )
    assert completed.returncode == 2 and completed.stderr.startswith("usage: activate.sh")


def test_what_the_deployer_reads():
    assert parse_answer(0, "phase=succeeded\nactivated /nix/store/x\n", "") == (
        Phase.SUCCEEDED,
        "activated /nix/store/x",
    )
    assert parse_answer(0, "phase=missing\n", "")[0] is Unanswered.NOT_STARTED
    assert parse_answer(255, "", "ssh: connect refused") == (
        Unanswered.NOT_STARTED,
        "ssh: connect refused",
    )
    assert WorkerDir("/run/flakefleet/activation/x").confirm == (
        "/run/flakefleet/activation/x/confirm"
    )


def test_a_worker_that_died_is_told_from_one_that_runs(machine):
    activation = machine.activation(machine.system("new", "sleep 30"))
    worker = machine.start(activation)
    deadline = time.monotonic() + 30
    while not Path(activation.directory.phase).exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # started
    state_dir = activation.state_dir
    counts = subprocess.run(
        ["sh", "-c", workers_command(state_dir)], capture_output=True, text=True
    )
    assert counts.stdout.strip() == "workers 1 0"
    worker.kill()  # killed, as by the OOM killer: its phase stays `running`
    worker.wait()
    assert Path(activation.directory.phase).read_text().strip() == "running"
    assert machine.answer(activation) == (
        Unanswered.GONE,
        "the activation worker died (killed, or out of memory)",
    )
    counts = subprocess.run(
        ["sh", "-c", workers_command(state_dir)], capture_output=True, text=True
    )
    assert counts.stdout.strip() == "workers 0 1"
    assert Path(activation.directory.phase).read_text().strip() == "failed"  # so it is counted once
