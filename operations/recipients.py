"""Machine identities (`flakefleet.recipients`): the recipients file against the known hosts.

Nothing here runs on a machine: the host keys are those the fleet's known hosts hold, which
is what every connection is checked against.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pyinfra import host, state

from flakefleet import recipients, vars
from flakefleet.keys import KeyProblem
from flakefleet.run import Run
from flakefleet.settings import layers


def known_key(run: Run, name: str) -> str | None:
    """A machine's ed25519 host key as its known hosts file holds it."""
    target = run.target(name)
    known_hosts = target.known_hosts or os.path.expanduser("~/.ssh/known_hosts")
    return recipients.known_host_key(known_hosts, target.address, target.port)


def check() -> None:
    """Stop the run, before any machine is contacted, if a selected machine's host key is not
    the one the recipients file lists (its secrets are encrypted to the old one): one line per
    machine, with both fingerprints."""
    run = Run.of(state)
    with run.lock:
        if run.recipient_problems is None:
            run.recipient_problems = _changed(run)
    if run.recipient_problems:
        reasons = {line.split(":", 1)[0]: line.split(": ", 1)[1] for line in run.recipient_problems}
        run.stop(run.recipient_problems, reasons, "not deployed: a machine's host key changed")


def _changed(run: Run) -> list[str]:
    lines = []
    for each in run.state.inventory.get_active_hosts():
        named = run.settings(each.name, keep=False).recipients_file
        path = run.cwd / named
        try:
            listed = recipients.Recipients.read(path).machines.get(each.name)
        except recipients.RecipientError as error:
            lines.append(f"{each.name}: {error}")
            continue
        known = known_key(run, each.name) if listed else None
        if listed and known and known.split()[:2] != listed.split()[:2]:
            lines.append(
                f"{each.name}: host key changed since {named} "
                f"was written (there {recipients.fingerprint(listed)}, known hosts now "
                f"{recipients.fingerprint(known)}): its secrets are encrypted to the old one; "
                "run deploy/recipients.py"
            )
    return lines


def update() -> list[str]:
    """Once per run: write every machine's host key into the recipients file, re-encrypt the
    age files the rules name, write the .sops.yaml rules; what changed, a line each."""
    run = Run.of(state)
    with run.lock:
        if run.recipient_problems is None:
            run.recipient_problems = _update(run)
    return run.recipient_problems


def _generated(run: Run, settings: Any, found: recipients.Recipients) -> dict[Path, list[str]]:
    """The generated vars' secret files (`flakefleet.vars`) with their machines: re-encrypted
    like the rules' files when a machine's host key changes."""
    readers: dict[str, list[str]] = {}
    fleet = str(run.fleet_file)
    for each in run.state.inventory:
        try:
            declared = vars.declared(each.name, layers(each, run.state.inventory, fleet))
        except KeyProblem:
            continue  # a deploy says what is wrong with it
        for name in declared:
            readers.setdefault(name, []).append(each.name)
    files = vars.Store.of(run.cwd, settings).secrets(readers)
    return {path: machines for path, machines in files.items()
            if all(machine in found.machines for machine in machines)}  # fmt: skip


def _update(run: Run) -> list[str]:
    settings = run.settings(host.name)  # the files are the fleet's: any machine's settings
    path = run.cwd / settings.recipients_file
    found = recipients.Recipients.read(path)
    roles: dict[str, list[str]] = {}
    lines = []
    for each in run.state.inventory:
        roles[each.name] = [group for group in each.groups]
        key = known_key(run, each.name)
        if key is None:
            lines.append(f"{each.name}: no ssh-ed25519 key in its known hosts: left out")
            continue
        if found.machines.get(each.name, "").split()[:2] != key.split()[:2]:
            lines.append(f"{each.name}: host key {recipients.fingerprint(key)}")
            found.machines[each.name] = key
    for name in sorted(set(found.machines) - set(roles)):
        lines.append(f"{name}: no longer in the fleet: removed")
        del found.machines[name]
    if found.write(path):
        lines.append(f"wrote {settings.recipients_file}")
    rules_path = run.cwd / settings.secrets_rules
    files = recipients.rules(rules_path, roles)
    files.update(_generated(run, settings, found))
    if files:
        if not settings.age_identity:
            raise recipients.RecipientError("re-encrypting needs the setting 'age_identity'")
        identity = run.cwd / os.path.expanduser(settings.age_identity)
        lock = path.parent / recipients.LOCK  # beside the recipients file
        for done in recipients.rekey(files, found, identity, lock):
            if done.changed:
                lines.append(f"re-encrypted {os.path.relpath(done.file, run.cwd)}")
    if settings.sops_config:
        sops = run.cwd / settings.sops_config
        root = str(Path(settings.recipients_file).parent)
        text = recipients.sops_config(found, roles, root)
        if not sops.exists() or sops.read_text() != text:
            sops.write_text(text)
            lines.append(f"wrote {settings.sops_config}")
    return lines
