"""Sources in /var/src, krops' layout: each source is /var/src/<name>.

A source's tree lives in /var/src/.flakefleet/<name>/<digest>, and /var/src/<name> is a symlink
to it. A sync copies into a new `<digest>.partial` directory (hard-linking unchanged files from
the live tree) and then swaps the symlink with one rename, so /var/src/<name> is always wholly
old or wholly new, whenever the deploy is interrupted.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from pyinfra import host
from pyinfra.api import FunctionCommand, StringCommand, operation

from facts.sources import SOURCES_ROOT, STORE_DIR, VarSrc
from flakefleet import report
from flakefleet.digest import DEFAULT_EXCLUDES, tree_digest
from flakefleet.process import CommandError, run
from flakefleet.ssh import ssh_command, ssh_destination


@operation()
def tree(source: str, path: str, var_src: VarSrc):
    """Copy a local directory to /var/src/<source>, unless its content is already there.

    + source: the name under /var/src (e.g. ``config``)
    + path: the local directory
    + var_src: the machine's /var/src as read by the ``Sources`` fact

    Example:

    .. code:: python

        sources.tree(name="Flake", source="config", path="example", var_src=machine.var_src)
    """
    local = Path(path)
    digest = tree_digest(local)
    current = var_src.sources.get(source, "absent")
    if current == digest:
        host.noop(f"/var/src/{source} is already at {digest[:12]}")
        return
    if source in var_src.sources and current is None:
        yield report.stop(f"sources: /var/src/{source} exists and was not put there by flakefleet")
        return

    store = f"{SOURCES_ROOT}/{STORE_DIR}/{source}"
    yield FunctionCommand(_push, (local, store, digest, current), {})
    yield StringCommand(_swap_script(source, store, digest))
    yield report.change("sources")


def _push(state: Any, host: Any, local: Path, store: str, digest: str, previous: str) -> bool:
    """rsync the tree into <store>/<digest>.partial, hard-linking what the live tree has."""
    argv = [
        "rsync",
        "--archive",
        "--delete",
        "--stats",
        *(f"--exclude=/{name}" for name in DEFAULT_EXCLUDES),
        "--rsh",
        ssh_command(host.data),
        "--rsync-path",
        f"mkdir -p {shlex.quote(store)} && rsync",
    ]
    if previous not in ("absent", None):
        argv.append(f"--link-dest=../{previous}")
    argv += [f"{local}/", f"{ssh_destination(host.data, host.name)}:{store}/{digest}.partial/"]
    try:
        run(argv)
    except CommandError as error:
        report.failed(host.name, f"sources: {error}")
        return False
    return True


def _swap_script(source: str, store: str, digest: str) -> str:
    """Make <digest> the live tree of the source with one rename, then drop older trees."""
    link = f"{SOURCES_ROOT}/{source}"
    tmp_link = f"{SOURCES_ROOT}/.{source}.flakefleet-new"
    return " && ".join(
        [
            f"cd {shlex.quote(store)}",
            f"rm -rf {digest}",
            f"mv {digest}.partial {digest}",
            f"ln -sfn {STORE_DIR}/{source}/{digest} {shlex.quote(tmp_link)}",
            f"mv -T {shlex.quote(tmp_link)} {shlex.quote(link)}",
            f"find . -mindepth 1 -maxdepth 1 ! -name {digest} -exec rm -rf {{}} +",
        ]
    )
