"""The controller's Nix commands: evaluate, build and copy systems.

Every call passes its settings explicitly (experimental features, `--option`s) instead of
relying on the controller's nix.conf.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from flakefleet.process import CommandError, run

FEATURES = ["--extra-experimental-features", "nix-command flakes"]

# Where each machine class keeps its system in the flake, as attribute paths.
CONFIGURATION_ATTRIBUTES = {
    "nixos": ("nixosConfigurations", "{name}", "config", "system", "build", "toplevel"),
    "darwin": ("darwinConfigurations", "{name}", "system"),
    "home": ("homeConfigurations", "{user}@{name}", "activationPackage"),
}


class NixError(RuntimeError):
    """A Nix command failed for a reason a user can act on."""


@dataclass(frozen=True)
class System:
    """A machine's system as evaluated from the flake: its derivation and its output path."""

    drv: str
    out: str


def option_flags(options: Mapping[str, str]) -> list[str]:
    """`--option NAME VALUE` for each Nix setting."""
    return [flag for name, value in options.items() for flag in ("--option", name, str(value))]


def configuration_attribute(machine_class: str, name: str, user: str) -> list[str]:
    """The flake attribute path of a machine's system, e.g. nixosConfigurations.web1...toplevel."""
    return [part.format(name=name, user=user) for part in CONFIGURATION_ATTRIBUTES[machine_class]]


def evaluate_systems(
    flake: Path, attributes: Mapping[str, Sequence[str]], options: Mapping[str, str]
) -> dict[str, System]:
    """Evaluate many machines' systems in one Nix evaluation.

    If the batch fails, each machine is evaluated alone so the error names the machine; the
    machines that do evaluate are returned, the others raise from `System` lookups by the caller.
    """
    try:
        return _evaluate(flake, attributes, options)
    except CommandError as error:
        if len(attributes) == 1:
            raise NixError(f"evaluation failed: {_nix_error(error.output)}") from error
    systems: dict[str, System] = {}
    for name, attribute in attributes.items():
        try:
            systems.update(_evaluate(flake, {name: attribute}, options))
        except CommandError:
            continue
    return systems


def evaluation_error(flake: Path, attribute: Sequence[str], options: Mapping[str, str]) -> str:
    """Why one machine's system does not evaluate (used after a failed batch)."""
    try:
        _evaluate(flake, {"machine": attribute}, options)
    except CommandError as error:
        return _nix_error(error.output)
    return "evaluation succeeded on retry"


def _evaluate(
    flake: Path, attributes: Mapping[str, Sequence[str]], options: Mapping[str, str]
) -> dict[str, System]:
    # JSON strings are valid Nix strings for the names and paths allowed in a fleet file.
    entries = " ".join(
        f"{json.dumps(name)} = paths (get {_nix_list(path)});" for name, path in attributes.items()
    )
    expression = (
        f"let flake = builtins.getFlake {json.dumps(f'path:{flake}')}; "
        "get = builtins.foldl' (set: key: builtins.getAttr key set) flake; "
        "paths = system: { drv = system.drvPath; out = system.outPath; }; "
        f"in {{ {entries} }}"
    )
    completed = run(
        [
            "nix",
            *FEATURES,
            *option_flags(options),
            "eval",
            "--impure",
            "--json",
            "--expr",
            expression,
        ]
    )
    return {name: System(**value) for name, value in json.loads(completed.stdout).items()}


def _nix_list(items: Sequence[str]) -> str:
    return "[ " + " ".join(json.dumps(item) for item in items) + " ]"


def realise(drvs: Sequence[str], options: Mapping[str, str]) -> str:
    """Build derivations (all of them, as far as possible); returns Nix's log for failures."""
    completed = run(
        ["nix-store", *option_flags(options), "--realise", "--keep-going", *drvs], check=False
    )
    return completed.stderr


def build_failure(log: str, drv: str) -> str:
    """The lines of a `nix-store --realise` log that explain why one derivation failed."""
    name = Path(drv).name
    lines = [line for line in log.splitlines() if name in line or "error:" in line]
    return _nix_error("\n".join(lines)) if lines else "build failed"


def copy_closure(
    path: str, destination: str, ssh_command_options: Sequence[str], options: Mapping[str, str]
) -> int:
    """Copy a closure to a machine over `ssh://`, sending only the paths it lacks.

    Returns how many store paths were sent.
    """
    env = {"NIX_SSHOPTS": " ".join(ssh_command_options)}
    try:
        completed = run(
            [
                "nix",
                *FEATURES,
                *option_flags(options),
                "copy",
                "--to",
                f"ssh://{destination}",
                path,
            ],
            env=env,
        )
    except CommandError as error:
        raise NixError(f"copy to {destination} failed: {_nix_error(error.output)}") from error
    match = re.search(r"copying (\d+) paths", completed.stderr)
    return int(match.group(1)) if match else 0


def _nix_error(output: str) -> str:
    """The first `error:` line of Nix's output, or its last line."""
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    for line in lines:
        if line.startswith("error:"):
            return line
    return lines[-1] if lines else "(no output)"
