"""Git sources, fetched and checked out on the controller and sent as trees, so machines
never need to reach the repository."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from flakefleet.process import CommandError, run
from flakefleet.sources.model import GIT_MTIME, PRUNE_AFTER


class GitError(RuntimeError):
    """A repository that cannot be fetched, or a ref it does not have."""

    def __init__(self, field_name: str, message: str) -> None:
        self.field_name = field_name
        super().__init__(message)


class GitCache:
    """Repositories fetched on the controller and checked out there, per commit.

    The machine never reaches the repository: the checkout (with its `.git`) is sent like a
    file tree, so a machine needs neither network access, credentials nor git. Each URL is
    fetched at most once per run, and not at all when the ref is a commit already fetched.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._fetched: set[str] = set()

    def _dir(self, url: str) -> Path:
        return self.root / hashlib.sha256(url.encode()).hexdigest()[:16]

    @contextlib.contextmanager
    def _locked(self, url: str) -> Iterator[Path]:
        """The URL's cache directory, locked against other deploys on this controller."""
        directory = self._dir(url)
        directory.mkdir(parents=True, exist_ok=True)
        with (directory / "lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield directory

    def commit(self, url: str, ref: str) -> str:
        """The commit `ref` names in the repository at `url` (fetching it first)."""
        with self._locked(url) as directory:
            mirror = directory / "mirror.git"
            if not mirror.exists():
                run(["git", "init", "--quiet", "--bare", str(mirror)])
            known = self._resolve(mirror, ref)
            if known == ref.lower():  # a full commit id already here: nothing can move it
                return known
            if url not in self._fetched:
                self._fetch(mirror, url, ["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"])
                self._fetched.add(url)
            commit = self._resolve(mirror, ref)
            if commit is None and re.fullmatch(r"[0-9a-fA-F]{7,40}", ref):
                # A commit no branch or tag reaches, if the server hands those out.
                with contextlib.suppress(GitError):
                    self._fetch(mirror, url, [ref])
                commit = self._resolve(mirror, ref)
            if commit is None:
                raise GitError("ref", f"ref {ref!r} does not exist in {url}")
            return commit

    def _fetch(self, mirror: Path, url: str, refspecs: list[str]) -> None:
        try:
            run(
                ["git", "-C", str(mirror), "fetch", "--quiet", "--prune", "--force", "--no-tags",
                 url, *refspecs],
                env={"GIT_TERMINAL_PROMPT": "0"},
                timeout=600,
            )  # fmt: skip
        except CommandError as error:
            lines = [line for line in error.output.splitlines() if line.strip()]
            raise GitError("url", f"cannot fetch {url}: {lines[0] if lines else error}") from None

    @staticmethod
    def _resolve(mirror: Path, ref: str) -> str | None:
        completed = run(
            ["git", "-C", str(mirror), "rev-parse", "--verify", "--quiet", "--end-of-options",
             f"{ref}^{{commit}}"],
            check=False,
        )  # fmt: skip
        return completed.stdout.strip() or None if completed.returncode == 0 else None

    def checkout(self, url: str, commit: str, submodules: bool) -> Path:
        """A checkout of `commit` (with its submodules if asked), made once and kept."""
        with self._locked(url) as directory:
            trees = directory / "trees"
            tree = trees / (commit + ("-submodules" if submodules else ""))
            (trees / f"{tree.name}.used").parent.mkdir(parents=True, exist_ok=True)
            (trees / f"{tree.name}.used").touch()
            if not tree.exists():
                self._make_checkout(directory / "mirror.git", url, commit, submodules, tree)
            prune_unused(trees, keep={tree.name, f"{tree.name}.used"}, marker=".used")
            return tree

    def _make_checkout(
        self, mirror: Path, url: str, commit: str, submodules: bool, tree: Path
    ) -> None:
        partial = tree.with_name(f"{tree.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        git = ["git", "-C", str(partial)]
        try:
            run(["git", "clone", "--quiet", "--no-checkout", str(mirror), str(partial)])
            run([*git, "remote", "set-url", "origin", url])
            run([*git, "checkout", "--quiet", "--detach", commit])
            if submodules:
                local = "://" not in url or url.startswith("file://")
                allow = ["-c", "protocol.file.allow=always"] if local else []
                run(
                    [*git, *allow, "submodule", "update", "--init", "--recursive", "--quiet"],
                    env={"GIT_TERMINAL_PROMPT": "0"},
                    timeout=600,
                )
        except CommandError as error:
            shutil.rmtree(partial, ignore_errors=True)
            lines = [line for line in error.output.splitlines() if line.strip()]
            problem = lines[-1] if lines else str(error)
            raise GitError("submodules" if submodules else "ref", problem) from None
        for path in [partial, *partial.rglob("*")]:
            os.utime(path, (GIT_MTIME, GIT_MTIME), follow_symlinks=False)
        partial.rename(tree)


def prune_unused(directory: Path, keep: set[str], marker: str) -> None:
    """Delete entries of `directory` whose `<name><marker>` file was not touched for a day."""
    now = time.time()
    for used in directory.glob(f"*{marker}"):
        if used.name in keep or now - used.stat().st_mtime < PRUNE_AFTER:
            continue
        shutil.rmtree(directory / used.name.removesuffix(marker), ignore_errors=True)
        used.unlink(missing_ok=True)
