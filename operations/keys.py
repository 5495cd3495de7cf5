"""Keys (`flakefleet.keys`): secrets uploaded over the machine's connection, out of band.

Each stage (before activation, after it, after a reboot the deploy made) costs at most one
command on the machine, and none when every key of the stage is in place: the preflight read
the machine's manifest, and the controller compares keyed digests.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any

from pyinfra import host, state
from pyinfra.api import FunctionCommand, operation

from flakefleet import keys, recipients, vars
from flakefleet.keys import Changes, Key, KeysInvalid, RunKeys, Upload
from flakefleet.models import KeyOnMachine, MachineClass
from flakefleet.run import Run
from flakefleet.settings import layers
from operations import recipients as identities
from operations.preflight import changes_machine


def declared(*, planning: bool = False) -> tuple[Key, ...]:
    """This machine's keys, checked and read on the controller.

    The first call of a run reads every selected machine's keys (decrypts the age files, runs
    the commands) before any machine is contacted; bad input stops the whole run with one line
    per problem, naming the machine, the key, where it was declared and the field. A plan
    (`planning`) runs no command and generates nothing (see ``flakefleet.keys.RunKeys``).
    """
    session = Run.of(state)
    with session.lock:
        if session.keys is None:
            session.keys = _check_selected(session, planning)
        checked = session.keys
    if isinstance(checked, KeysInvalid):
        reasons = {bad.machine: f"keys: {bad.detail}" for bad in checked.errors}
        session.stop(checked.lines, reasons, "not deployed: bad keys stopped the run")
    return checked.machines[host.name]


def _check_selected(session: Run, planning: bool) -> RunKeys | KeysInvalid:
    fleet = str(session.fleet_file)
    inventory = session.state.inventory
    machines = []
    problems: list[keys.KeyProblem] = []
    generated, var_paths = _generate(session, problems, planning)
    for each in inventory.get_active_hosts():
        if each.name not in generated:
            continue  # its generators are bad: said above
        found = [generated[each.name], *layers(each, inventory, fleet)]
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
        machines.append(
            (each.name, found, session.settings(each.name, keep=False).age_identity, root_group)
        )
    try:
        checked = keys.check_run(session.cwd, machines, var_paths, planning=planning)
    except KeysInvalid as error:
        return KeysInvalid([*problems, *error.errors])
    return KeysInvalid(problems) if problems else checked


def _generate(
    session: Run, problems: list[keys.KeyProblem], planning: bool = False
) -> tuple[dict[str, tuple[str, dict]], dict[str, dict[str, Path]]]:
    """Run the generators every selected machine lacks (or is told to regenerate), before its
    keys are read (none for a plan); each machine's generated keys as the lowest data layer,
    and where its secret files are stored. Bad generators are added to `problems`."""
    fleet = str(session.fleet_file)
    inventory = session.state.inventory
    declared_by: dict[str, dict[str, vars.Generator]] = {}
    for each in inventory:  # all machines: a shared generator is encrypted to every reader
        try:
            declared_by[each.name] = vars.declared(each.name, layers(each, inventory, fleet))
        except keys.KeyProblem as error:
            if each in inventory.get_active_hosts():
                problems.append(error)
    made: set[tuple[str, str]] = set()
    generated, var_paths = {}, {}
    for each in inventory.get_active_hosts():
        if each.name not in declared_by:
            continue
        generators = declared_by[each.name]
        settings = session.settings(each.name, keep=False)
        store = vars.Store.of(session.cwd, settings)
        admins = recipients.Recipients.read(session.cwd / settings.recipients_file).admins

        recipients_of = partial(_recipients_of, session, declared_by, admins, each.name)
        identity = settings.age_identity
        try:
            if not planning:
                vars.generate(
                    each.name, generators, store, recipients_of,
                    session.cwd / os.path.expanduser(identity) if identity else None,
                    settings.regenerate, done=made,
                )  # fmt: skip
        except keys.KeyProblem as error:
            problems.append(error)
            continue
        except keys.ContentError as error:
            problems.append(keys.KeyProblem(each.name, None, "data key 'generators'", str(error),
                                            None, "generator"))  # fmt: skip
            continue
        generated[each.name] = vars.key_layer(each.name, generators)
        var_paths[each.name] = {
            f"{name}/{file}": store.path(each.name, generator, file)
            for name, generator in generators.items()
            for file, secret in generator.files.items()
            if secret
        }
    return generated, var_paths


def _recipients_of(
    session: Run,
    declared_by: dict[str, dict[str, vars.Generator]],
    admins: dict[str, str],
    machine: str,
    generator: vars.Generator,
) -> list[str]:
    """Whom a generator's secret files are encrypted to: the admins, and the host key of its
    machine (of every machine that declares it, for a shared one)."""
    readers = (
        sorted(name for name, declared in declared_by.items() if generator.name in declared)
        if generator.share
        else [machine]
    )
    found = {name: identities.known_key(session, name) for name in readers}
    missing = [name for name, key in found.items() if key is None]
    if missing or not admins:
        problem = (
            f"no host key in the known hosts for {', '.join(missing)}"
            if missing
            else "the recipients file lists no admin, who alone could deploy it"
        )
        raise keys.KeyProblem(machine, generator.name, generator.origin, problem, None,
                              "generator")  # fmt: skip
    return sorted(admins.values()) + [key for key in found.values() if key]


@operation()
@changes_machine
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
@changes_machine
def restore(wanted: tuple[Key, ...]):
    """After a reboot this deploy made, upload every key again (a tmpfs such as /run/keys
    came back empty); nothing when the machine was not rebooted (the reboot step ran before
    this generator does)."""
    if wanted and "rebooted" in Run.of(state).outcome(host.name).changed:
        yield FunctionCommand(_restore, (wanted,), {})


def _restore(state: Any, host: Any, wanted: tuple[Key, ...]) -> bool:
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
