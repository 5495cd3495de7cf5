"""The controller's Nix commands: evaluate, build, sign, copy, root systems, diff closures.
(The Nix command lines flakefleet runs on machines are in `flakefleet.remote_nix`.)

Every call passes its settings explicitly (experimental features, `--option`s) instead of
relying on the controller's nix.conf.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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


@dataclass(frozen=True, order=True)
class FromCommand:
    """A Nix setting whose value a command prints (an access token from a password store):
    Nix gets it in its environment (NIX_CONFIG), never on a command line or in a log."""

    command: str
    # What it printed, once read: one read per machine and run (a password store may ask).
    read: list[str] = field(default_factory=list, compare=False, hash=False, repr=False)


Options = Mapping[str, "str | FromCommand"]  # a machine's `nix_options`


def option_flags(options: Options) -> list[str]:
    """`--option NAME VALUE` for each Nix setting given as it is (not those read from a
    command: see `option_environment`)."""
    return [
        flag
        for name, value in options.items()
        if not isinstance(value, FromCommand)
        for flag in ("--option", name, str(value))
    ]


def option_environment(options: Options) -> dict[str, str]:
    """The environment that gives Nix the settings read from commands: NIX_CONFIG, after the
    controller's own (a process's environment is readable only by its user and root, unlike
    its command line, which `ps` shows everyone)."""
    lines = [
        f"{name} = {command_value(name, value)}"
        for name, value in options.items()
        if isinstance(value, FromCommand)
    ]
    if not lines:
        return {}
    return {"NIX_CONFIG": "\n".join([os.environ.get("NIX_CONFIG", ""), *lines]).lstrip("\n")}


def command_value(name: str, source: FromCommand) -> str:
    """What a setting's command prints; a failure is said without its output, which may hold
    part of the secret."""
    if not source.read:
        completed = run(["sh", "-c", source.command], check=False)
        value = completed.stdout.strip()
        if completed.returncode != 0 or not value or "\n" in value:
            problem = (
                f"exited {completed.returncode}"
                if completed.returncode
                else "printed no value or more than one line"
            )
            raise NixError(f"nix_options {name!r}: the command {source.command!r} {problem}")
        source.read[:] = [value]
    return source.read[0]


@dataclass(frozen=True)
class Flake:
    """A flake as a run evaluates it: its directory, and inputs overridden for this run only
    (`override_inputs`: `--override-input NAME REF`, e.g. a local checkout)."""

    path: Path
    overrides: tuple[tuple[str, str], ...] = ()

    def lock_flags(self) -> list[str]:
        """The lock file is used as it is: never updated (in Nix 2.8 a lock that would change
        is then an error, and `--override-input` alone already keeps it from being written;
        `--no-write-lock-file` would turn that error into a warning and fetch the input)."""
        return ["--no-update-lock-file", *self.override_flags()]

    def override_flags(self) -> list[str]:
        return [flag for name, ref in self.overrides for flag in ("--override-input", name, ref)]

    @property
    def reference(self) -> str:
        return flake_reference(self.path)


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
    root = _git_root(flake)
    if root is None:
        return f"path:{flake}"
    directory = flake.resolve().relative_to(root).as_posix()
    query = "" if directory == "." else f"?dir={quote(directory)}"
    return f"git+file://{quote(root.as_posix())}{query}"


def tracked_files(flake: Path) -> list[str] | None:
    """The files of the flake's directory that Nix takes for it, relative to it: for a flake
    in git (see `flake_reference`), those git tracks that exist; None when Nix takes every
    file (`path:`)."""
    if _git_root(flake) is None:
        return None
    return _existing_tracked(flake)


def _existing_tracked(directory: Path) -> list[str]:
    """The files git tracks under a directory of a work tree that exist, relative to it."""
    listed = run(["git", "-C", str(directory), "ls-files", "-z", "--cached"]).stdout
    names = (name for name in listed.split("\0") if name)
    return sorted(n for n in names if (directory / n).is_symlink() or (directory / n).exists())


def flake_source(flake: Path) -> tuple[Path, list[str] | None]:
    """The directory Nix copies to the store for the flake (see `flake_reference`: the top of
    its git work tree, or the flake's directory) and, in git, the files of it Nix takes."""
    root = _git_root(flake)
    if root is None:
        return flake.resolve(), None
    # The top's files, not `tracked_files(root)`: the flake.nix may be in a subdirectory.
    return root, _existing_tracked(root)


def requisites(paths: Sequence[str]) -> set[str]:
    """Every store path the given ones need (for derivations: every derivation and source their
    builds need)."""
    listed = run(["nix-store", "--query", "--requisites", *paths]).stdout
    return set(listed.split())


def settings_text(options: Options) -> str:
    """The controller's Nix settings as an evaluation has them (`nix show-config`), without
    those read from commands (their values may be secrets)."""
    return run(["nix", *FEATURES, *option_flags(options), "show-config", "--json"]).stdout


def flake_revision(flake: Path) -> tuple[str | None, bool]:
    """The git commit a flake is evaluated from, and whether files git tracks have changes
    not in it (Nix's `rev`, or its `dirtyRev`); (None, False) outside git."""
    root = _git_root(flake)
    if root is None:
        return None, False
    head = run(["git", "-C", str(root), "rev-parse", "--verify", "-q", "HEAD"], check=False)
    changes = run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"])
    return (head.stdout.strip() or None), bool(changes.stdout.strip())


def _git_root(flake: Path) -> Path | None:
    """The top of the git work tree the flake is in, if git tracks its flake.nix."""
    try:
        top = run(["git", "-C", str(flake), "rev-parse", "--show-toplevel"], check=False)
        tracked = run(
            ["git", "-C", str(flake), "ls-files", "--error-unmatch", "flake.nix"], check=False
        )
    except OSError:  # no git here
        return None
    if top.returncode != 0 or tracked.returncode != 0:
        return None
    return Path(top.stdout.strip()).resolve()


# What a traced evaluation says on stderr (Nix 2.8 at -vvv): the flake's files it reads (every
# read of a source file passes the check pure evaluation makes), and our marker when it starts
# on a machine's system.
ACCESS = re.compile(r"^checking access to '(/nix/store/[^']+)'$")
MARKER = "flakefleet evaluates "


@dataclass
class Traced:
    """One `nix eval` of some machines of one flake output: their systems, or the error and the
    machine it was evaluating then (None: before any machine, e.g. the lock file); and what each
    machine may have read (`reads`)."""

    systems: dict[str, System] = field(default_factory=dict)
    error: str | None = None
    failed: str | None = None
    # The store paths Nix checked before each machine's evaluation ended, in the order it went
    # (by name): a machine's own reads and those before it, which it may have reused.
    reads: dict[str, list[str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def evaluate_traced(flake: Flake, attributes: Mapping[str, Attributes], options: Options) -> Traced:
    """Evaluate machines of one flake output in one `nix eval` (`FLAKE#OUTPUT --apply`), purely,
    as nixos-rebuild, darwin-rebuild and home-manager do (no --impure: no currentSystem,
    environment or <nixpkgs>), with the inputs the lock file pins; logged enough (-vvv) to say
    which of the flake's files each machine read.

    Nix prints the attribute set sorted by name and forces each value whole before the next,
    so a trace at the start of each machine divides the file checks between machines. Nix
    checks each path once per process, so a machine may also depend on checks made before its
    own start: `Traced.reads` gives each machine everything checked up to its end.
    """
    outputs = {alternatives[0][0] for alternatives in attributes.values()}
    assert len(outputs) == 1, outputs  # a machine's alternatives share an output
    output = outputs.pop()
    selection = selection_expression(f"{{ {json.dumps(output)} = output; }}", attributes)
    apply = (
        "output: builtins.mapAttrs (name: system: builtins.trace "
        f'"{MARKER}${{name}}" {{ drv = system.drvPath; out = system.outPath; }}) ({selection})'
    )
    argv = ["nix", *FEATURES, *option_flags(options), "eval", "--json", "-vvv"]
    completed = run(
        [*argv, *flake.lock_flags(), f"{flake.reference}#{output}", "--apply", apply],
        env=option_environment(options),
        check=False,
    )
    traced = Traced()
    checked: list[str] = []
    current: str | None = None
    for line in completed.stderr.splitlines():
        if access := ACCESS.match(line):
            checked.append(access.group(1))
        elif line.startswith(f"trace: {MARKER}"):
            if current is not None:
                traced.reads[current] = list(checked)
            current = line.removeprefix(f"trace: {MARKER}")
        elif "is dirty" in line and line.startswith("warning:"):
            traced.warnings.append(line)  # Nix's own: uncommitted changes are evaluated
    if completed.returncode != 0:
        traced.error, traced.failed = _nix_error(completed.stderr, last=True), current
        return traced
    if current is not None:
        traced.reads[current] = checked
    traced.systems = {name: System(**value) for name, value in json.loads(completed.stdout).items()}
    return traced


def lock_problem(flake: Flake, options: Options) -> str | None:
    """Why the flake's lock file cannot be used as it is, in one line naming each input that
    would need locking and the command that locks it; None when it can.

    One `nix flake metadata --no-update-lock-file` (no fetch when every input is locked: it
    reads the lock file); only when that fails, a second one that may fetch computes the lock
    Nix wants (`--no-write-lock-file`), whose differences name the inputs.
    """
    argv = ["nix", *FEATURES, *option_flags(options), "flake", "metadata", "--json"]
    env = option_environment(options)
    checked = run([*argv, *flake.lock_flags(), flake.reference], env=env, check=False)
    unlocked = "requires lock file changes" in checked.stderr or "mutable input" in checked.stderr
    if checked.returncode == 0 and not unlocked:
        return None
    if not unlocked:
        return f"{flake.path}: {_nix_error(checked.stderr)}"
    computed = run(
        [*argv, "--no-write-lock-file", *flake.override_flags(), flake.reference],
        env=env,
        check=False,
    )
    names = list(dict.fromkeys(re.findall(r"• \w+ input '([^']+)'", computed.stderr)))
    lock = flake.path / "flake.lock"
    files = tracked_files(flake.path)
    untracked = files is not None and lock.exists() and "flake.lock" not in files
    command = f"nix flake lock {flake.path}" + (" && git add flake.lock" if untracked else "")
    if names:
        what = ", ".join(f"input {name!r}" for name in names)
        where = "is not tracked by git" if untracked else "does not lock"
        return f"{lock} {where} {what}: lock with `{command}`"
    return f"{lock}: {_nix_error(checked.stderr)} (lock with `{command}`)"


def _nix_list(items: Sequence[str]) -> str:
    return "[ " + " ".join(json.dumps(item) for item in items) + " ]"


def realise(drvs: Sequence[str], options: Options) -> str:
    """Build derivations (all of them, as far as possible); returns Nix's log for failures."""
    completed = run(
        ["nix-store", *option_flags(options), "--realise", "--keep-going", *drvs],
        env=option_environment(options),
        check=False,
    )
    return completed.stderr


def downloads(drv: str, options: Options) -> list[str]:
    """The fixed-output derivations (fetchurl, fetchgit, ...) a build of `drv` would have to
    run, as their names: each needs the network (a substituter would have had them). Asked
    without building (`nix-store --realise --dry-run`)."""
    planned = run(
        ["nix-store", *option_flags(options), "--realise", "--dry-run", drv],
        env=option_environment(options),
        check=False,
    )
    built = re.findall(r"^\s+(/nix/store/\S+\.drv)$", planned.stderr, re.MULTILINE)
    if not built:
        return []
    shown = run(["nix", *FEATURES, "show-derivation", *built], check=False)
    if shown.returncode != 0:
        return []
    derivations = json.loads(shown.stdout)
    return sorted(
        {
            Path(path).name.split("-", 1)[-1].removesuffix(".drv")
            for path, derivation in derivations.items()
            if any("hash" in output for output in derivation.get("outputs", {}).values())
        }
    )


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
    options: Options,
    flags: Sequence[str] = (),
) -> int:
    """Copy closures to a store (a machine over SSH, or a binary cache), sending only the
    paths it lacks. Returns how many store paths were sent."""
    env = {"NIX_SSHOPTS": " ".join(ssh_command_options), **option_environment(options)}
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
    options: Options,
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


def update_inputs(flake: Flake, inputs: Sequence[str] = ()) -> list[str]:
    """Update the flake's lock file: every input, or only `inputs` (`nix flake update`, `nix
    flake lock --update-input`); Nix's lines saying what changed. Raises NixError."""
    if inputs:
        updates = [flag for name in inputs for flag in ("--update-input", name)]
        argv = ["nix", *FEATURES, "flake", "lock", *updates, flake.reference]
    else:
        argv = ["nix", *FEATURES, "flake", "update", flake.reference]
    try:
        completed = run(argv)
    except CommandError as error:
        raise NixError(f"updating the inputs of {flake.path}: {_nix_error(error.output)}") from None
    said = [line.strip() for line in completed.stderr.splitlines() if line.strip()]
    return [line for line in said if not line.startswith("warning: Git tree")]


def commit_lock(flake: Flake) -> str | None:
    """Commit the flake's lock file alone, if git tracks the flake and the lock changed;
    the commit's line, or None."""
    root = _git_root(flake.path)
    lock = flake.path / "flake.lock"
    if root is None or not lock.exists():
        return None
    relative = str(lock.relative_to(root))
    run(["git", "-C", str(root), "add", "--", relative])
    staged = run(
        ["git", "-C", str(root), "diff", "--cached", "--quiet", "--", relative], check=False
    )
    if staged.returncode == 0:
        return None  # no change to commit
    message = "flake.lock: update inputs"
    run(["git", "-C", str(root), "commit", "-q", "-m", message, "--", relative])
    head = run(["git", "-C", str(root), "log", "-1", "--format=%h %s"]).stdout.strip()
    return head


def flake_check(flake: Flake) -> str | None:
    """`nix flake check --no-build` of the flake as a run takes it (its lock file as it is,
    this run's input overrides): None when it passes, else its error in one line."""
    argv = ["nix", *FEATURES, "flake", "check", "--no-build", *flake.lock_flags()]
    try:
        run([*argv, flake.reference])
    except CommandError as error:
        return _nix_error(error.output)
    return None


def closure_size(path: str) -> int | None:
    """The size of a path's closure in this controller's store (bytes), or None when the store
    lacks it (or part of it)."""
    if not Path(path).exists():
        return None
    try:
        output = run(["nix", *FEATURES, "path-info", "--closure-size", "--json", path]).stdout
        return int(json.loads(output)[0]["closureSize"])
    except (CommandError, ValueError, LookupError, TypeError):
        return None


def _safe_url(url: str) -> str:
    """A store URL without its query (which may name a secret key file)."""
    return url.split("?", 1)[0]


def _nix_error(output: str, *, last: bool = False) -> str:
    """The first `error:` line of Nix's output (`last`: its last, after a verbose log), or its
    last line."""
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    if errors:
        return errors[-1] if last else errors[0]
    return lines[-1] if lines else "(no output)"
