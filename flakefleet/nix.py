"""The controller's Nix commands: evaluate, build, sign, copy, root systems, diff closures.
(The Nix command lines flakefleet runs on machines are in `flakefleet.remote_nix`.)

Every call passes its settings explicitly (experimental features, `--option`s) instead of
relying on the controller's nix.conf.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from flakefleet.process import CommandError, run

FEATURES = ["--extra-experimental-features", "nix-command flakes"]

# Where each machine class keeps its system in the flake, as attribute paths: the first one
# the flake has is used (home-manager flakes name a configuration "user@host" or just "user").
CONFIGURATION_ATTRIBUTES: dict[str, tuple[tuple[str, ...], ...]] = {
    "nixos": (("nixosConfigurations", "{name}", "config", "system", "build", "toplevel"),),
    "darwin": (("darwinConfigurations", "{name}", "system"),),
    "home": (
        ("homeConfigurations", "{user}@{name}", "activationPackage"),
        ("homeConfigurations", "{user}", "activationPackage"),
    ),
}

# Nix's own words when a destination refuses a path for want of a trusted signature: Nix 2.8
# says "lacks a valid signature", later ones (2.26 here) "lacks a signature by a trusted key".
UNTRUSTED = (
    "lacks a valid signature",
    "lacks a signature by a trusted key",
    "is not signed by any of the keys",
)


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


def configuration_attribute(machine_class: str, name: str, user: str) -> list[list[str]]:
    """The flake attribute paths a machine's system may have, most specific first.

    Example: ``configuration_attribute("home", "home1", "deploy")[0] ==
    ["homeConfigurations", "deploy@home1", "activationPackage"]``.
    """
    return [
        [part.format(name=name, user=user) for part in path]
        for path in CONFIGURATION_ATTRIBUTES[machine_class]
    ]


def describe_attribute(alternatives: Sequence[Sequence[str]]) -> str:
    """An attribute path for messages: ``nixosConfigurations.web1.config.system...``."""
    return " or ".join(".".join(path) for path in alternatives)


Attributes = Sequence[Sequence[str]]  # alternative attribute paths of one system


def evaluate_systems(
    flake: Path, attributes: Mapping[str, Attributes], options: Mapping[str, str]
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


def evaluation_error(flake: Path, attribute: Attributes, options: Mapping[str, str]) -> str:
    """Why one machine's system does not evaluate (used after a failed batch)."""
    try:
        _evaluate(flake, {"machine": attribute}, options)
    except CommandError as error:
        return _nix_error(error.output)
    return "evaluation succeeded on retry"


def systems_expression(flake: str, attributes: Mapping[str, Attributes]) -> str:
    """A Nix expression: each machine's system from a flake, as ``{ <machine> = <drv>; }``.

    `flake` is a Nix expression for the flake reference, e.g. ``"path:/repo/example"``: the
    same text evaluates here and builds on a machine.
    """
    return selection_expression(f"builtins.getFlake ({flake})", attributes)


def selection_expression(outputs: str, attributes: Mapping[str, Attributes]) -> str:
    """A Nix expression: each machine's system from a flake's outputs (a Nix expression), as
    ``{ <machine> = <drv>; }``, the first of its alternative attribute paths the outputs have."""
    # JSON strings are valid Nix strings for the names and paths allowed in a fleet file.
    entries = " ".join(
        f"{json.dumps(name)} = pick [ {' '.join(_nix_list(path) for path in alternatives)} ];"
        for name, alternatives in attributes.items()
    )
    return (
        f"let flake = {outputs}; "
        "step = found: key: if found != null && builtins.isAttrs found && found ? ${key} "
        "then found.${key} else null; "
        "lookup = builtins.foldl' step flake; "
        "found = builtins.filter (path: lookup path != null); "
        "pick = paths: let hits = found paths; in "
        "builtins.foldl' (set: key: builtins.getAttr key set) flake "
        "(if hits == [ ] then builtins.head paths else builtins.head hits); "
        f"in {{ {entries} }}"
    )


def flake_reference(flake: Path) -> str:
    """The flake as `nixos-rebuild --flake <dir>` has Nix take it: in a git work tree whose
    index has its flake.nix, `git+file:` (the files git tracks, uncommitted changes included,
    `?dir=` for a subdirectory; Nix 2.8 warns when the tree is dirty); otherwise `path:`
    (every file in the directory)."""
    try:
        top = run(["git", "-C", str(flake), "rev-parse", "--show-toplevel"], check=False)
        tracked = run(
            ["git", "-C", str(flake), "ls-files", "--error-unmatch", "flake.nix"], check=False
        )
    except OSError:  # no git here
        return f"path:{flake}"
    if top.returncode != 0 or tracked.returncode != 0:
        return f"path:{flake}"
    root = Path(top.stdout.strip()).resolve()
    directory = flake.resolve().relative_to(root).as_posix()
    query = "" if directory == "." else f"?dir={quote(directory)}"
    return f"git+file://{quote(root.as_posix())}{query}"


def _evaluate(
    flake: Path, attributes: Mapping[str, Attributes], options: Mapping[str, str]
) -> dict[str, System]:
    """Evaluate purely, as nixos-rebuild, darwin-rebuild and home-manager do (no --impure:
    no builtins.currentSystem, environment or <nixpkgs>): `nix eval FLAKE#OUTPUT --apply`,
    once per flake output the machines are in (nixosConfigurations, ...)."""
    reference = flake_reference(flake)
    by_output: dict[str, dict[str, Attributes]] = {}
    for name, alternatives in attributes.items():  # a machine's alternatives share an output
        by_output.setdefault(alternatives[0][0], {})[name] = alternatives
    systems: dict[str, System] = {}
    warnings: dict[str, None] = {}
    for output, group in by_output.items():
        selection = selection_expression(f"{{ {json.dumps(output)} = output; }}", group)
        apply = (
            "output: builtins.mapAttrs "
            f"(name: system: {{ drv = system.drvPath; out = system.outPath; }}) ({selection})"
        )
        argv = ["nix", *FEATURES, *option_flags(options), "eval", "--json"]
        completed = run([*argv, f"{reference}#{output}", "--apply", apply])
        # Nix's own warning that uncommitted changes are evaluated, shown once.
        lines = completed.stderr.splitlines()
        warnings.update(dict.fromkeys(line for line in lines if "is dirty" in line))
        systems.update(
            {name: System(**value) for name, value in json.loads(completed.stdout).items()}
        )
    for warning in warnings:
        print(warning, file=sys.stderr)
    return systems


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


def copy_flags(
    *, substitute: bool = False, check_sigs: bool = True, protocol: str = "ssh"
) -> list[str]:
    """`nix copy` flags for where the machine may fetch from and whether it checks signatures."""
    flags = []
    if substitute:
        flags.append("--substitute-on-destination")
        if protocol == "ssh-ng":  # before Nix 2.20, ssh-ng substitutes only with this setting
            flags += ["--option", "builders-use-substitutes", "true"]
    if not check_sigs:
        flags.append("--no-check-sigs")
    return flags


def copy_paths(
    paths: Sequence[str],
    destination: str,
    ssh_command_options: Sequence[str],
    options: Mapping[str, str],
    flags: Sequence[str] = (),
) -> int:
    """Copy closures to a store (a machine over SSH, or a binary cache), sending only the
    paths it lacks. Returns how many store paths were sent."""
    env = {"NIX_SSHOPTS": " ".join(ssh_command_options)}
    argv = ["nix", *FEATURES, *option_flags(options), "copy", *flags, "--to", destination, *paths]
    try:
        completed = run(argv, env=env)
    except CommandError as error:
        raise NixError(
            f"copy to {_safe_url(destination)} failed: {copy_error(error.output)}"
        ) from error
    return copied_count(completed.stderr)


def copy_derivations(
    drvs: Sequence[str],
    destination: str,
    ssh_command_options: Sequence[str],
    options: Mapping[str, str],
) -> int:
    """Copy derivations (and what building them needs) to a builder's store."""
    return copy_paths(drvs, destination, ssh_command_options, options, ["--derivation"])


def copied_count(log: str) -> int:
    """How many paths a `nix copy` sent, from its ``copying N paths...`` line."""
    match = re.search(r"copying (\d+) paths", log)
    return int(match.group(1)) if match else 0


def copy_error(output: str) -> str:
    """Why a copy failed, saying so plainly when the destination refused a signature."""
    error = _nix_error(output)
    if any(words in output for words in UNTRUSTED):
        return (
            "the destination does not trust the closure's signatures (sign it with a key the "
            f"machine lists in trusted-public-keys): {error}"
        )
    return error


def sign_paths(
    paths: Sequence[str],
    key_file: str,
    store: str | None = None,
    ssh_command_options: Sequence[str] = (),
) -> None:
    """Sign closures recursively with a secret key, in the local store or (`store`) in a
    builder's store over ssh-ng, where only the signatures travel."""
    argv = ["nix", *FEATURES, "store", "sign", "--recursive", "--key-file", key_file]
    if store:
        argv += ["--store", store]
    try:
        run([*argv, *paths], env={"NIX_SSHOPTS": " ".join(ssh_command_options)})
    except CommandError as error:
        raise NixError(f"signing failed: {_nix_error(error.output)}") from error


def add_root(link: Path, path: str) -> None:
    """Make `link` a garbage collector root for `path` in the controller's store."""
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        run(["nix-store", "--add-root", str(link), "--indirect", "--realise", path])
    except CommandError as error:
        raise NixError(f"cannot add a GC root for {path}: {_nix_error(error.output)}") from error


ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


def diff_closures(old: str, new: str) -> list[str] | None:
    """The package changes from one system's closure to another's (`nix store diff-closures`:
    ``name: old version → new version[, ±size]``), or None when the controller's store lacks
    either closure."""
    if not (Path(old).exists() and Path(new).exists()):
        return None
    try:
        output = run(["nix", *FEATURES, "store", "diff-closures", old, new]).stdout
    except CommandError:
        return None  # e.g. a closure only partly in this store
    # Nix 2.8 colours the size even on a pipe.
    return [ANSI_COLOUR.sub("", line) for line in output.splitlines() if line.strip()]


def _safe_url(url: str) -> str:
    """A store URL without its query (which may name a secret key file)."""
    return url.split("?", 1)[0]


def _nix_error(output: str) -> str:
    """The first `error:` line of Nix's output, or its last line."""
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    for line in lines:
        if line.startswith("error:"):
            return line
    return lines[-1] if lines else "(no output)"
