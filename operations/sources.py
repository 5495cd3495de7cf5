"""Sources in /var/src, krops' layout: each source is /var/src/<name>.

A source's tree lives in /var/src/.flakefleet/<name>/<digest>, and /var/src/<name> is a symlink
to it; that holds for every type (a pipe's file, a symlink's link and a derivation's result
link sit at the same place). A sync copies into a new `<digest>.partial` (hard-linking unchanged
files from the live tree), then one command on the machine renames it into place and swaps
each symlink with one rename, so /var/src/<name> is always wholly old or wholly new, whenever
the deploy is interrupted. Whether a source changed is decided from the digest computed on the
controller and the one the preflight read: a machine whose sources are all in place costs no
command at all here.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

from pyinfra import host, logger, state
from pyinfra.api import FunctionCommand, operation

from flakefleet.models import STORE_DIR, VarSrc, sources_undo_file
from flakefleet.process import CommandError, run
from flakefleet.run import Run, change, fail
from flakefleet.settings import layers
from flakefleet.sources import (
    BuildError,
    MachineSources,
    Ready,
    RunSources,
    SourcesInvalid,
    check_run,
    config_layer,
    filter_options,
)
from flakefleet.target import Target
from operations.preflight import changes_machine

# The remote half of a sync: shell functions the install commands below use.
INSTALL_FUNCTIONS = files("operations").joinpath("scripts/install-sources.sh").read_text()


def declared(commands: bool = True) -> MachineSources:
    """This machine's sources, checked and digested on the controller.

    The first call of a run checks every selected machine's declarations (types, names,
    local paths, git URLs and refs, pipe commands), before anything is copied to any machine;
    bad input stops the whole run with one line per problem, naming machine and source.
    `commands`: whether pipe sources' commands run (a plan's first call says no).
    """
    session = Run.of(state)
    with session.lock:
        if session.sources is None:
            session.sources = _check_selected(session, commands)
        checked = session.sources
    if isinstance(checked, SourcesInvalid):
        reasons = {bad.machine: f"sources: {bad.detail}" for bad in checked.errors}
        session.stop(checked.lines, reasons, "not deployed: bad sources stopped the run")
    return checked.machines[host.name]


def _check_selected(session: Run, commands: bool) -> RunSources | SourcesInvalid:
    fleet = str(session.fleet_file)
    inventory = session.state.inventory
    machines = [
        (
            each.name,
            [
                *config_layer(session.settings(each.name).flake),
                *layers(each, inventory, fleet),
            ],
            session.settings(each.name),
        )
        for each in inventory.get_active_hosts()
    ]
    try:
        return check_run(session.cwd, machines, commands)
    except SourcesInvalid as error:
        return error


@operation()
@changes_machine
def sync(wanted: MachineSources, var_src: VarSrc):
    """Make the machine's /var/src hold exactly its declared sources.

    Builds that are not cached run first (a failure stops the machine before anything of it
    is copied); then every changed file, git or pipe source is sent with rsync, and one
    command installs them, links symlinks, realises derivations and removes sources no longer
    declared.

    + wanted: the machine's sources, from ``declared()``
    + var_src: the machine's /var/src as read by the ``Sources`` fact

    Example:

    .. code:: python

        sources.sync(name="Sources", wanted=sources.declared(), var_src=machine.var_src)
    """
    refusal = guard(wanted, var_src)
    if refusal:
        yield fail(f"sources: {refusal}")
        return
    built: dict[str, Ready] = {}
    for item in wanted.pending_builds():
        yield FunctionCommand(_build, (item, built), {})
    changes = changes_for(wanted.finalize(built), var_src, wanted)
    if not changes:
        host.noop(f"{var_src.root} already holds its {len(wanted.sources)} sources")
        return
    for item, tree in changes.install:
        if item.local is not None:
            yield FunctionCommand(_push, (item, tree, var_src, wanted.rsync_options), {})
    run = Run.of(state)
    undo = sources_undo_file(var_src.root, run.id)
    yield run.target(host.name).command(install_script(changes, var_src.root, undo))
    yield change("sources")


def guard(wanted: MachineSources, var_src: VarSrc) -> str | None:
    """Why /var/src must not be touched (another tool's tree), or None.

    Like krops' sentinel: a /var/src that holds anything but lacks flakefleet's marker is left
    alone, and so is any entry flakefleet did not make, unless the data forces it.
    """
    if wanted.force:
        return None
    root = var_src.root
    if var_src.exists and not var_src.managed and not var_src.empty:
        return (
            f"{root} holds files but no flakefleet marker ({root}/{STORE_DIR}): another tool's "
            "tree, or a wrong address? Deploy with --data sources_force=true to take it over"
        )
    for item in wanted.sources:
        name = item.source.name
        if name in var_src.sources and var_src.sources[name] is None:
            return (
                f"{root}/{name} exists and was not put there by flakefleet "
                "(--data sources_force=true moves it aside)"
            )
    return None


@dataclass(frozen=True)
class Changes:
    """What one sync does to a machine's /var/src."""

    install: tuple[tuple[Ready, str], ...] = ()  # each source to install, with its tree's name
    remove: tuple[str, ...] = ()  # sources no longer declared
    orphans: tuple[str, ...] = ()  # store directories nothing links to (an interrupted sync)
    displace: tuple[str, ...] = ()  # foreign entries moved aside (forced)

    def __bool__(self) -> bool:
        return bool(self.install or self.remove or self.orphans or self.displace)


def changes_for(items: list[Ready], var_src: VarSrc, wanted: MachineSources) -> Changes:
    """Compare the sources' digests with the machine's: what to install and what to remove."""
    install = []
    displace = []
    for item in items:
        name = item.source.name
        current = var_src.sources.get(name, "absent")
        if current == item.digest and not wanted.resync:
            continue
        if current is None:
            displace.append(name)
        assert item.digest is not None
        install.append((item, tree_name(item.digest, var_src.live.get(name))))
    names = {item.source.name for item in items}
    remove = sorted(
        name
        for name, digest in var_src.sources.items()
        if digest is not None and name not in names and not wanted.keep_undeclared
    )
    orphans = sorted(var_src.stored - set(var_src.live) - names)
    return Changes(tuple(install), tuple(remove), tuple(orphans), tuple(displace))


def tree_name(digest: str, live: str | None) -> str:
    """The store directory for a new tree: its digest, unless that is the live tree's name
    (a resync), which must not be touched before the swap."""
    return digest if live != digest else f"{digest}.{time.time_ns()}"


def _build(state: Any, host: Any, item: Ready, built: dict[str, Ready]) -> bool:
    """Run a source's build stage on the controller (in parallel with other machines', at most
    one per core)."""
    session = Run.of(state)
    checked = session.sources
    assert isinstance(checked, RunSources)
    try:
        with session.build_slots:
            built[item.source.name] = checked.built(item)
    except BuildError as error:
        logger.error(f"{host.print_prefix}build of {item.source.name} failed:\n{error.output}")
        session.outcome(host.name).fail(f"sources: {item.source.name}: {error}")
        return False
    return True


def _push(state: Any, host: Any, item: Ready, tree: str, var_src: VarSrc, options: tuple) -> bool:
    """rsync one source into <store>/<tree>.partial on the machine."""
    session = Run.of(state)
    store = f"{var_src.root}/{STORE_DIR}/{item.source.name}"
    live = var_src.live.get(item.source.name)
    target = session.target(host.name)
    try:
        with target.rsync_shell() as (shell, descriptors):
            argv = rsync_command(item, tree, store, live, target, shell, options)
            run(argv, pass_fds=descriptors)
    except CommandError as error:
        session.outcome(host.name).fail(f"sources: {item.source.name}: {error}")
        return False
    return True


def rsync_command(
    item: Ready,
    tree: str,
    store: str,
    live: str | None,
    target: Target,
    shell: list[str],
    options: tuple = (),
) -> list[str]:
    """The rsync command line that sends a source's local file or tree into the store, over
    `shell` (the target's `rsync_shell`), received as root.

    Files are compared by content (`checksum`) or by size and time to the nanosecond, so a
    change rsync would miss cannot hide behind a new digest.
    """
    assert item.local is not None
    directory = item.local.is_dir()
    argv = [
        "rsync",
        "--archive",
        "--stats",
        "--checksum" if item.checksum else "--modify-window=-1",
        *filter_options(item.source.include, item.source.exclude, item.source.only),
        *options,
        "--rsh",
        shlex.join(shell),
        "--rsync-path",
        target.rsync_path(f"mkdir -p {shlex.quote(store)}"),
    ]
    if directory and live:
        argv.append(f"--link-dest=../{live}")
    destination = f"{target.destination}:{store}/{tree}.partial"
    if directory:
        return [*argv, f"{item.local}/", f"{destination}/"]
    return [*argv, str(item.local), destination]


def install_script(changes: Changes, root: str, undo: str | None = None) -> str:
    """The one command that installs a sync's trees, links and derivations, in order, and
    removes what is no longer declared; with `undo`, what it replaced is written there."""
    lines = [f"r={shlex.quote(root)}", f"store={shlex.quote(STORE_DIR)}"]
    if undo:
        lines.append(f"undo={shlex.quote(undo)}")
    lines.append(INSTALL_FUNCTIONS)
    if undo:
        lines.append('rm -rf "${undo%/*}"; mkdir -p "${undo%/*}"; : > "$undo"')
    if any(item.source.type == "derivation" for item, _ in changes.install):
        lines.append('NIX_PATH="$r"; export NIX_PATH  # <name> is /var/src/name, as with krops')
    for name in map(shlex.quote, changes.displace):
        lines += ['mkdir -p "$s/.displaced"', f'mv "$r"/{name} "$s/.displaced/"{name}.$(date +%s)']
    for item, tree in changes.install:
        lines += _install_lines(item, tree)
    lines += [f"unlink {shlex.quote(name)}" for name in changes.remove]
    lines += [f"drop {shlex.quote(name)}" for name in changes.orphans]
    return "\n".join(lines)


def _install_lines(item: Ready, tree: str) -> list[str]:
    source = item.source
    name, path = shlex.quote(source.name), f'"$s"/{shlex.quote(source.name)}/{shlex.quote(tree)}'
    if item.local is not None:
        return [f"rm -rf {path}", f"mv {path}.partial {path}", f"live {name} {shlex.quote(tree)}"]
    lines = [f'mkdir -p "$s"/{name}', f"rm -rf {path}"]
    if source.type == "symlink":
        target = source.target if source.target.startswith("/") else f"../../{source.target}"
        lines.append(f"ln -s {shlex.quote(target)} {path}")
    elif source.expression:
        expression = shlex.quote(source.expression)
        lines.append(f"realise {name} nix-build --quiet -E {expression} -o {path}")
    else:
        nix = "nix --extra-experimental-features 'nix-command flakes'"
        flake = f'"$(flake {shlex.quote(source.flake)})"'
        lines.append(f"realise {name} {nix} build --out-link {path} {flake}")
    return [*lines, f"live {name} {shlex.quote(tree)}"]
