"""The local build stage: a machine's artifact, built on the controller before the sync
and cached by a digest of its inputs."""

from __future__ import annotations

import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from flakefleet.process import run
from flakefleet.sources.model import KEEP_BUILDS, BuildError, Source


@dataclass(frozen=True)
class BuildStage:
    """A source's build for one machine, in `.flakefleet/build/<machine>/<source>/<key>/`.

    `key` is a digest of the inputs' content, the command and the output: a build whose key
    has a finished directory is not run again.
    """

    machine: str
    source: Source
    key: str
    directory: Path

    @property
    def finished(self) -> Path:
        return self.directory / self.key

    @property
    def output(self) -> Path:
        assert self.source.build is not None
        return self.finished / self.source.build.output

    def cached(self) -> bool:
        return self.output.is_dir()

    def digest_memo(self, rules: str) -> Path:
        """Where the digest of the finished output, copied by `rules`, is kept (beside it)."""
        return self.directory / f"{self.key}.digest-{rules}"

    def run(self) -> Path:
        """Build in a fresh directory; returns the output directory or raises BuildError."""
        assert self.source.build is not None
        build = self.source.build
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = self.directory / f"{self.key}.partial-{os.getpid()}-{threading.get_ident()}"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        for destination, local in build.inputs:
            _copy_in(local, partial / destination)
        completed = run(
            ["sh", "-c", f"exec 2>&1\n{build.command}"],
            cwd=str(partial),
            env={"FLAKEFLEET_MACHINE": self.machine, "FLAKEFLEET_SOURCE": self.source.name},
            check=False,
        )
        log = self.directory / "build.log"
        log.write_text(completed.stdout)
        if completed.returncode != 0 or not (partial / build.output).is_dir():
            failed = self.directory / "failed"
            shutil.rmtree(failed, ignore_errors=True)
            partial.rename(failed)
            tail = " | ".join(line.strip() for line in completed.stdout.strip().splitlines()[-3:])
            why = (
                f"exited {completed.returncode}"
                if completed.returncode
                else f"made no {build.output!r} directory"
            )
            message = f"build failed ({why}): {tail or '(no output)'} [log: {log}]"
            raise BuildError(message, completed.stdout)
        if self.finished.exists():  # another deploy built the same inputs meanwhile
            shutil.rmtree(partial)
        else:
            partial.rename(self.finished)
        self.prune_unused()
        return self.output

    def prune_unused(self) -> None:
        builds = [p for p in self.directory.iterdir() if p.is_dir() and len(p.name) == 64]
        builds.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        for old in builds[KEEP_BUILDS:]:
            if old.name != self.key:
                shutil.rmtree(old, ignore_errors=True)
                for memo in self.directory.glob(f"{old.name}.digest-*"):
                    memo.unlink(missing_ok=True)


def _copy_in(local: Path, destination: Path) -> None:
    """Copy a file or tree into the build directory, keeping symlinks as symlinks."""
    if local.is_dir():
        shutil.copytree(local, destination, symlinks=True, dirs_exist_ok=True)
    else:
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(local, destination, follow_symlinks=False)
