"""Keys (`flakefleet.keys`): secrets uploaded over the machine's connection, out of band.

Each stage (before activation, after it, after a reboot the deploy made) costs at most one
command on the machine, and none when every key of the stage is in place: the preflight read
the machine's manifest, and the controller compares keyed digests.
"""

from __future__ import annotations

from typing import Any

from pyinfra import host, state
from pyinfra.api import FunctionCommand, operation

from flakefleet import keys
from flakefleet.keys import Changes, Key, KeysInvalid, RunKeys, Upload
from flakefleet.models import KeyOnMachine, MachineClass
from flakefleet.run import Run
from flakefleet.settings import layers


def declared() -> tuple[Key, ...]:
    """This machine's keys, checked and read on the controller.

    The first call of a run reads every selected machine's keys (decrypts the age files, runs
    the commands) before any machine is contacted; bad input stops the whole run with one line
    per problem, naming the machine, the key, where it was declared and the field.
    """
    session = Run.of(state)
    with session.lock:
        if session.keys is None:
            session.keys = _check_selected(session)
        checked = session.keys
    if isinstance(checked, KeysInvalid):
        reasons = {bad.machine: f"keys: {bad.detail}" for bad in checked.errors}
        session.stop(checked.lines, reasons, "not deployed: bad keys stopped the run")
    return checked.machines[host.name]


def _check_selected(session: Run) -> RunKeys | KeysInvalid:
    fleet = str(session.fleet_file)
    inventory = session.state.inventory
    machines = []
    problems = []
    for each in inventory.get_active_hosts():
        found = layers(each, inventory, fleet)
        machine_class = session.target(each.name).machine_class
        if machine_class is MachineClass.HOME and any(data.get("keys") for _, data in found):
            problems.append(
                keys.KeyProblem(
                    each.name,
                    None,
                    "data key 'keys'",
                    "a home-manager machine has no root to own keys; declare them on the "
                    "machine its user logs into",
                    None,
                )
            )
            continue
        root_group = "wheel" if machine_class is MachineClass.DARWIN else "root"
        machines.append((each.name, found, session.settings(each.name).age_identity, root_group))
    try:
        checked = keys.check_run(session.cwd, machines)
    except KeysInvalid as error:
        return KeysInvalid([*problems, *error.errors])
    return KeysInvalid(problems) if problems else checked


@operation()
def upload(
    wanted: tuple[Key, ...],
    on_machine: dict[str, KeyOnMachine],
    stage: Upload,
):
    """Upload the keys of one stage that the machine does not hold as declared; before
    activation, also remove the keys it holds that are no longer declared.

    + wanted: the machine's keys, from ``declared()``
    + on_machine: its manifest, as the preflight read it
    + stage: ``Upload.PRE_ACTIVATION`` or ``Upload.POST_ACTIVATION``
    """
    names = [key.name for key in wanted]
    changes = keys.changes_for(wanted, on_machine, stage, names)
    if not changes:
        host.noop(f"{host.name} holds its {stage} keys")
        return
    yield FunctionCommand(_upload, (changes, stage), {})


@operation(is_idempotent=False)
def restore(wanted: tuple[Key, ...]):
    """After a reboot this deploy made, upload every key again (a tmpfs such as /run/keys
    came back empty); nothing when the machine was not rebooted."""
    if wanted:
        yield FunctionCommand(_restore, (wanted,), {})


def _restore(state: Any, host: Any, wanted: tuple[Key, ...]) -> bool:
    if "rebooted" not in Run.of(state).outcome(host.name).changed:
        return True
    changes = keys.changes_for(wanted, {}, None, [key.name for key in wanted], again=True)
    return _upload(state, host, changes, None)


def _upload(state: Any, host: Any, changes: Changes, stage: Upload | None) -> bool:
    run = Run.of(state)
    outcome = run.outcome(host.name)
    script, content = keys.upload_script(changes), keys.upload_input(changes)
    succeeded, output = run.target(host.name).run_over(host, script, stdin=content)
    refused = [line for line in output.stdout_lines if line.startswith(keys.REFUSED)]
    if refused or not succeeded:
        if refused:
            reason = refused[-1].removeprefix(keys.REFUSED)
        else:
            lines = [line for line in output.stderr_lines if line.strip()]
            reason = lines[-1] if lines else "the upload failed"
        if stage is Upload.PRE_ACTIVATION and "does not exist (yet)" in reason:
            reason += "; if the new system creates it, set upload = 'post-activation'"
        outcome.fail(f"keys: {reason}")
        return False
    done = [f"uploaded {len(changes.write)}"] if changes.write else []
    done += [f"removed {len(changes.remove)}"] if changes.remove else []
    outcome.changed_by("keys")
    outcome.note(f"keys: {', '.join(done)}")
    return True
