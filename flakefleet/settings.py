"""The settings a deploy reads from each machine's data, checked before any machine is
contacted.

A machine's value for a setting comes from the highest of pyinfra's data layers that has it:
``group_data/all.py``, then the machine's groups (``group_data/<class or role>.py``), then the
fleet file, then ``--data``. A bad value stops the whole run with one line per problem, naming
the machine, the setting and the layer it came from. So does a name one letter or two away from
a setting's: ``on_check_faliure = "keep"`` would otherwise be ignored in silence, and the
machine deployed with the default. (`sources` have checks of their own, in
``flakefleet.sources``.)
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from flakefleet import builds, cache, nix, rollout, signing
from flakefleet.fleet import NAME_PATTERN, REPOSITORY_KEY
from flakefleet.models import Goal


class CheckFailure(StrEnum):
    """What a failed health check does to a machine that was just activated."""

    ROLLBACK = "rollback"
    KEEP = "keep"  # the new system stays (the machine is still reported failed)
    STOP = "stop"  # roll back, and activate no further machine in this run


class RebootPolicy(StrEnum):
    NEVER = "never"
    WHEN_NEEDED = "when-needed"
    ALWAYS = "always"


CHECK_FAILURE_POLICIES = tuple(CheckFailure)
REBOOT_POLICIES = tuple(RebootPolicy)
COPY_PROTOCOLS = ("ssh", "ssh-ng")

# What a value must be: a check returns the problem with a value, or None.
Check = Callable[[Any], str | None]


def _one_of(*choices: str) -> Check:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check


def _boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be True or False"


def _number(minimum: int, *, whole: bool = False, optional: bool = False) -> Check:
    def check(value: Any) -> str | None:
        if value is None and optional:
            return None
        kinds = (int,) if whole else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or value < minimum:
            return f"must be a {'whole ' if whole else ''}number of at least {minimum}" + (
                " (or None)" if optional else ""
            )
        return None

    return check


def _text(*, optional: bool = False, absolute: bool = False) -> Check:
    def check(value: Any) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value:
            return "must be a non-empty string" + (" (or None)" if optional else "")
        if absolute and not value.startswith("/"):
            return "must be an absolute path"
        return None

    return check


def _text_list(value: Any) -> str | None:
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return None
    return "must be a list of strings"


def _nix_options(value: Any) -> str | None:
    """Nix settings: a value, or {"command": ...} for one read from a command's output."""
    if isinstance(value, Mapping) and all(
        isinstance(key, str)
        and (
            isinstance(item, str | int | float | bool)
            or (
                isinstance(item, Mapping)
                and set(item) == {"command"}
                and isinstance(item["command"], str)
                and item["command"].strip()
            )
        )
        for key, item in value.items()
    ):
        return None
    return (
        "must be a mapping of Nix settings to values or {'command': ...}, e.g. "
        "{'cores': '2', 'access-tokens': {'command': 'pass show forge-token'}}"
    )


def _overrides(value: Any) -> str | None:
    if isinstance(value, Mapping) and all(
        isinstance(key, str) and key and isinstance(ref, str) and ref for key, ref in value.items()
    ):
        return None
    return "must be a mapping of input names to flake references, e.g. {'mylib': '../mylib'}"


def _attribute_name(value: Any) -> str | None:
    if isinstance(value, str) and NAME_PATTERN.match(value):
        return None
    return "must be a name of letters, digits, '.', '_' or '-'"


def _meta(value: Any) -> str | None:
    if isinstance(value, Mapping) and all(isinstance(key, str) for key in value):
        return None
    return "must be a mapping, e.g. {'stateVersion': '25.11', 'users': ['alice']}"


def _checks(value: Any) -> str | None:
    if not isinstance(value, list):
        return "must be a list of checks, e.g. [{'command': 'systemctl is-active nginx'}]"
    for number, check in enumerate(value, 1):
        if not isinstance(check, Mapping) or ("command" in check) == ("http" in check):
            return f"check {number} needs either 'command' or 'http'"
        unknown = set(check) - {"command", "http", "status", "timeout"}
        if unknown:
            return f"check {number}: unknown field {sorted(unknown)[0]!r}"
        if _number(0)(check.get("timeout", 10)) or _number(100, whole=True)(
            check.get("status", 200)
        ):
            return f"check {number}: timeout must be seconds and status an HTTP status"
    return None


SETTINGS: dict[str, Check] = {
    "flake": _text(),
    "goal": _one_of(*Goal),
    "generation": _number(1, whole=True, optional=True),
    "confirm_timeout": _number(0),
    "on_check_failure": _one_of(*CHECK_FAILURE_POLICIES),
    "checks": _checks,
    "reboot": _one_of(*REBOOT_POLICIES),
    "reboot_timeout": _number(1),
    "reboot_command": _text(),
    "nix_options": _nix_options,
    "override_inputs": _overrides,
    "flake_attribute": _attribute_name,
    "eval_workers": _number(1, whole=True, optional=True),
    "eval_chunk": _number(1, whole=True),
    "eval_cache": _boolean,
    "meta": _meta,
    "copy_protocol": _one_of(*COPY_PROTOCOLS),
    "copy_compress": _boolean,
    "substitute_on_destination": _boolean,
    "signing_key": _text(),
    "sign_closures": _boolean,
    "keep_generations": _number(1, whole=True, optional=True),
    "remote_nix_dir": _text(optional=True, absolute=True),
    "sudo_password_command": _text(optional=True),
    "break_lock": _text(optional=True),
    "flake_check": _boolean,
    "update_inputs": _text_list,
    "update_commit": _boolean,
    "rollout": rollout.problem,
    "accept_machine_id": _text(optional=True),
    "smoke_check_processes": _number(1, whole=True),
    "check_unchanged": _boolean,
    "sources_keep_undeclared": _boolean,
    "sources_force": _boolean,
    "sources_resync": _boolean,
    "sources_rsync_options": _text_list,
    "age_identity": _text(optional=True),
    "recipients_file": _text(),
    "secrets_rules": _text(),
    "sops_config": _text(optional=True),
    "vars_dir": _text(optional=True),
    "regenerate": _text_list,
}
# Settings whose checks need the fleet (build_on, cache) or are their own (sources, keys).
OTHER_NAMES = {"build_on", "cache", "sources", "keys", "generators", REPOSITORY_KEY}


Layers = list[tuple[str, Mapping[str, Any]]]


def layers(host: Any, inventory: Any, fleet_file: str) -> Layers:
    """The data layers of a machine, lowest first, each with its label."""
    found: Layers = [("group_data/all.py", inventory.get_data())]
    found += [(f"group_data/{group}.py", inventory.get_group_data(group)) for group in host.groups]
    found.append((f"{fleet_file}, machine {host.name!r}", inventory.get_host_data(host.name)))
    found.append(("--data", inventory.get_override_data()))
    return found


def origin(found: Layers, name: str) -> str:
    """The label of the layer a setting's value comes from."""
    for label, data in reversed(found):
        if name in data:
            return label
    return "the deploy file"


def problems(
    data: Mapping[str, Any], found: Layers, fleet: Collection[str], cwd: Path
) -> list[str]:
    """Everything wrong with one machine's settings (its merged `data`, and the layers
    `found` they came from), a line each.

    Example: ``problems({"reboot": "often"}, [("--data", {"reboot": "often"})], [], cwd) ==
    ["setting 'reboot' (--data): must be one of never, when-needed, always, not 'often'"]``.
    """
    lines = []

    def add(name: str, problem: str, label: str | None = None) -> None:
        lines.append(f"setting {name!r} ({label or origin(found, name)}): {problem}")

    for name, check in SETTINGS.items():
        if name in data:
            problem = check(data[name])
            if problem:
                add(name, f"{problem}, not {data[name]!r}")
    try:
        builds.placement(data.get("build_on"), fleet)
    except ValueError as error:
        add("build_on", str(error).removeprefix("build_on: "))
    try:
        cache.parse(data.get("cache"), cwd, fleet)
    except cache.CacheError as error:
        add("cache", str(error).removeprefix("cache: "))

    known = SETTINGS.keys() | OTHER_NAMES
    for label, layer in found:
        for name in layer:
            if isinstance(name, str) and name not in known:
                near = difflib.get_close_matches(name, known, n=1, cutoff=0.85)
                if near:
                    add(name, f"unknown; did you mean {near[0]!r}?", label)
    return lines


def selected_problems(
    state: Any, fleet_label: str, locks_too: bool = True
) -> tuple[list[str], dict[str, str]]:
    """Every selected machine's problems, one line per problem (machines with the same one
    share it), and each machine's first problem; with `locks_too`, its flake's lock file's
    too (deploy/update.py checks them after updating it)."""
    fleet = [each.name for each in state.inventory]
    machines: dict[str, list[str]] = {}
    reasons: dict[str, str] = {}
    locks: dict[tuple[nix.Flake, tuple[tuple[str, Any], ...]], str | None] = {}
    for each in state.inventory.get_active_hosts():
        data = each.data.dict()
        cwd = Path(data.get(REPOSITORY_KEY) or state.cwd or ".")
        found = layers(each, state.inventory, fleet_label)
        found_problems = problems(data, found, fleet, cwd)
        if locks_too and not found_problems:  # its flake's lock, once per flake and settings
            settings = MachineSettings.from_data(data, fleet, cwd)
            key = (settings.flake_source(cwd), tuple(sorted(settings.nix_options.items())))
            if key not in locks:
                locks[key] = _lock_problem(*key)
            if locks[key]:
                found_problems.append(f"setting 'flake' ({origin(found, 'flake')}): {locks[key]}")
        for problem in found_problems:
            machines.setdefault(problem, []).append(each.name)
            reasons.setdefault(each.name, problem)
    lines = sorted(f"{', '.join(sorted(names))}: {problem}" for problem, names in machines.items())
    return lines, reasons


def _lock_problem(flake: nix.Flake, options: tuple[tuple[str, Any], ...]) -> str | None:
    try:
        return nix.lock_problem(flake, dict(options))
    except nix.NixError as error:  # a Nix setting's command failed
        return str(error)


@dataclass(frozen=True)
class MachineSettings:
    """A machine's settings, checked, with their defaults: the one place defaults live
    (group_data/all.py shows them as comments). How to reach the machine (its address, user,
    `remote_nix_dir`, `sudo_password_command`) is its `flakefleet.target.Target`."""

    flake: str = "."
    goal: Goal = Goal.SWITCH
    generation: int | None = None  # deploy/rollback.py: the generation to go back to
    confirm_timeout: float = 30
    on_check_failure: CheckFailure = CheckFailure.ROLLBACK
    checks: tuple[Mapping[str, Any], ...] = ()
    smoke_check_processes: int = 2
    check_unchanged: bool = True  # False: a machine this run did not change is not checked
    reboot: RebootPolicy = RebootPolicy.NEVER
    reboot_timeout: float = 300
    reboot_command: str = "reboot"
    nix_options: nix.Options = field(default_factory=dict)
    override_inputs: tuple[tuple[str, str], ...] = ()  # --override-input NAME REF, this run
    flake_attribute: str | None = None  # the machine's name in the flake, if not its own
    eval_workers: int | None = None  # `nix eval`s at once (None: cores and memory decide)
    eval_chunk: int = 1  # machines in one `nix eval`
    eval_cache: bool = True  # reuse evaluations whose inputs did not change
    meta: Mapping[str, Any] = field(default_factory=dict)
    build_on: builds.Placement = field(default_factory=lambda: builds.Placement("local"))
    cache: cache.Cache | None = None
    copy_protocol: str = "ssh"
    copy_compress: bool = False
    substitute_on_destination: bool = False
    signing_key: str = signing.DEFAULT_KEY
    sign_closures: bool = True
    keep_generations: int | None = None
    break_lock: str | None = None
    flake_check: bool = False  # `nix flake check --no-build` before any machine is touched
    update_inputs: tuple[str, ...] = ()  # deploy/update.py: the inputs to update (all: empty)
    update_commit: bool = False  # deploy/update.py: commit the new lock file
    rollout: rollout.Rollout = field(default_factory=rollout.Rollout)  # waves: one run's
    accept_machine_id: str | None = None  # the machine's new id, after a reinstall
    sources_keep_undeclared: bool = False
    sources_force: bool = False
    sources_resync: bool = False
    sources_rsync_options: tuple[str, ...] = ()
    age_identity: str | None = None  # the operator's age identity file, for `keys`
    recipients_file: str = "secrets/recipients.yaml"  # machines' host keys, admins' age keys
    secrets_rules: str = "secrets/rules.yaml"  # which machines and roles read each age file
    sops_config: str | None = None  # a .sops.yaml to write creation rules into
    vars_dir: str | None = None  # where generated vars are kept (None: the flake's vars/)
    regenerate: tuple[str, ...] = ()  # generators to run again, with what depends on them

    @classmethod
    def from_data(
        cls, data: Mapping[str, Any], fleet: Collection[str], cwd: Path
    ) -> MachineSettings:
        """The settings in a machine's data, which `problems` found nothing wrong with."""
        given = {
            name: data[name] for name in cls.__dataclass_fields__ if data.get(name) is not None
        }
        given["goal"] = Goal(given.get("goal", Goal.SWITCH))
        given["on_check_failure"] = CheckFailure(given.get("on_check_failure", "rollback"))
        given["reboot"] = RebootPolicy(given.get("reboot", "never"))
        given["checks"] = tuple(given.get("checks", ()))
        given["nix_options"] = {
            str(name): nix.FromCommand(value["command"])
            if isinstance(value, Mapping)
            else str(value)
            for name, value in given.get("nix_options", {}).items()
        }
        given["override_inputs"] = tuple(
            sorted(
                (name, _flake_reference(ref, cwd))
                for name, ref in given.get("override_inputs", {}).items()
            )
        )
        given["build_on"] = builds.placement(data.get("build_on"), fleet)
        given["cache"] = cache.parse(data.get("cache"), cwd, fleet)
        given["sources_rsync_options"] = tuple(map(str, given.get("sources_rsync_options", ())))
        given["rollout"] = rollout.parse(given.get("rollout"))
        given["update_inputs"] = tuple(map(str, given.get("update_inputs", ())))
        given["regenerate"] = tuple(map(str, given.get("regenerate", ())))
        return cls(**given)

    def flake_source(self, cwd: Path) -> nix.Flake:
        """The flake this machine is evaluated from, with this run's input overrides."""
        return nix.Flake((cwd / self.flake).resolve(), self.override_inputs)


def _flake_reference(ref: str, cwd: Path) -> str:
    """An override's flake reference; a relative path (`../mylib`) is the repository's, like
    every relative path in group data and --data."""
    if ":" in ref or not ref.startswith((".", "/")):
        return ref
    return str((cwd / ref).resolve())
