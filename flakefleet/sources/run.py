"""One run's sources: every selected machine's checked, digested and built once."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from flakefleet.files import write_atomically
from flakefleet.nix import tracked_files
from flakefleet.process import run
from flakefleet.sources.build import BuildStage
from flakefleet.sources.declarations import merge, parse
from flakefleet.sources.digests import (
    derivation_digest,
    digest_of,
    file_sha256,
    fingerprints,
    list_tree,
    only_rules,
    source_digest,
)
from flakefleet.sources.git import GitCache, GitError, prune_unused
from flakefleet.sources.model import (
    CONFIG,
    MANIFEST_DAYS,
    MANIFESTS,
    STATE_DIR,
    Source,
    SourceError,
    SourcesInvalid,
)


@dataclass(frozen=True)
class Ready:
    """A source as it goes to the machine: its digest (None while a build or the sources a
    derivation depends on are pending) and the local file or tree rsync sends (None for a
    symlink or a derivation)."""

    source: Source
    digest: str | None
    local: Path | None = None
    checksum: bool = False
    stage: BuildStage | None = None


@dataclass(frozen=True)
class MachineSources:
    """Everything the sources step needs for one machine, decided on the controller."""

    machine: str
    sources: tuple[Ready, ...]
    keep_undeclared: bool = False
    force: bool = False
    resync: bool = False
    rsync_options: tuple[str, ...] = ()

    def pending_builds(self) -> list[Ready]:
        """Sources whose build stage must run before their digest is known."""
        return [item for item in self.sources if item.stage is not None and item.digest is None]

    def finalize(self, built: Mapping[str, Ready]) -> list[Ready]:
        """Every source with its digest, once `built` holds the sources that were built.

        A derivation is realised on the machine and may read any other source, so its digest
        covers theirs: it is realised again whenever one of them changes.
        """
        items = [built.get(item.source.name, item) for item in self.sources]
        others = sorted(
            (item.source.name, item.digest or "")
            for item in items
            if item.source.type != "derivation"
        )
        return [
            replace(item, digest=derivation_digest(item.source, others))
            if item.source.type == "derivation"
            else item
            for item in items
        ]


class RunSources:
    """The sources of every selected machine of one run, checked and digested once.

    `commands`: whether pipe sources' commands run now (a plan runs none: their digests stay
    unknown). Each file tree's manifest is kept by digest (`manifest`), so a plan can say
    which files a sync would add, remove or change.
    """

    def __init__(self, root: Path, commands: bool = True) -> None:
        self.root = root
        self.commands = commands
        self.state = root / STATE_DIR
        self.git = GitCache(self.state / "git")
        self.machines: dict[str, MachineSources] = {}
        self._trees: dict[tuple[Any, ...], str] = {}
        self._flakes: dict[Path, Path | None] = {}
        self._empty = self.state / "empty"

    def add(
        self, machine: str, found: Sequence[tuple[str, Mapping[str, Any]]], settings: Any
    ) -> None:
        """Check and digest one machine's sources; raises SourceError on the first problem."""
        declared = merge(machine, found)
        items = []
        for name, spec in declared.items():
            source = parse(machine, name, spec, self.root)
            try:
                items.append(self._ready(machine, source))
            except GitError as error:
                origin = spec.origin(error.field_name)
                raise SourceError(machine, name, origin, str(error), error.field_name) from None
        # Derivations last: they are realised on the machine and may read the others.
        items.sort(key=lambda item: (item.source.type == "derivation", item.source.name))
        self.machines[machine] = MachineSources(
            machine=machine,
            sources=tuple(items),
            keep_undeclared=settings.sources_keep_undeclared,
            force=settings.sources_force,
            resync=settings.sources_resync,
            rsync_options=settings.sources_rsync_options,
        )

    def _ready(self, machine: str, source: Source) -> Ready:
        if source.type == "file" and source.build is not None:
            return self._built(machine, source)
        if source.type == "file":
            assert source.path is not None
            if source.name == CONFIG:
                source = replace(source, only=self._flake_files(source.path))
            return self._tree(source, source.path, source.checksum)
        if source.type == "git":
            commit = self.git.commit(source.url, source.ref)
            tree = self.git.checkout(source.url, commit, source.submodules)
            return Ready(source, source_digest(source, commit), tree, checksum=True)
        if source.type == "pipe":
            return self._pipe(machine, source) if self.commands else Ready(source, None)
        if source.type == "symlink":
            return Ready(source, source_digest(source, source.target))
        return Ready(source, None)  # a derivation: digested with the others (finalize)

    def _flake_files(self, flake: Path) -> Path | None:
        """The rules that send the flake's files as Nix takes them (in git, only the files
        it tracks: an untracked file, a decrypted secret say, stays here); None to send
        every file. Written once per run and flake."""
        flake = flake.resolve()
        if flake not in self._flakes:
            files = tracked_files(flake)
            rules = None
            if files is not None:
                text = only_rules(files)
                rules = self.state / "flake-files" / f"{hashlib.sha256(text.encode()).hexdigest()}"
                rules.parent.mkdir(parents=True, exist_ok=True)
                rules.write_text(text)
            self._flakes[flake] = rules
        return self._flakes[flake]

    def _tree(self, source: Source, path: Path, checksum: bool) -> Ready:
        key = (path.resolve(), source.include, source.exclude, source.only, checksum)
        if key not in self._trees:
            self._empty.mkdir(parents=True, exist_ok=True)
            entries = list_tree(path, source.include, source.exclude, self._empty, source.only)
            found = fingerprints(path, entries, checksum)
            self._trees[key] = digest_of(found)
            self._keep_manifest(source_digest(source, self._trees[key]), found)
        return Ready(source, source_digest(source, self._trees[key]), path, checksum)

    def _manifest(self, digest: str) -> Path:
        return self.state / MANIFESTS / f"{digest}.json"

    def _keep_manifest(self, digest: str, found: list[tuple[str, str]]) -> None:
        path = self._manifest(digest)
        if not path.exists():
            write_atomically(path, json.dumps(dict(found)))
        path.touch()  # used now: see `prune_manifests`

    def prune_manifests(self) -> None:
        """Forget the manifests of trees no run has digested for MANIFEST_DAYS (a machine's
        live tree is digested again by every deploy and plan that selects it)."""
        limit = time.time() - MANIFEST_DAYS * 86400
        for path in (self.state / MANIFESTS).glob("*.json"):
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < limit:
                    path.unlink()

    def manifest(self, digest: str) -> dict[str, str] | None:
        """What a tree of this digest held (entry -> fingerprint), if this controller has
        digested it (sent it, or planned it)."""
        try:
            return json.loads(self._manifest(digest).read_text())
        except (OSError, ValueError):
            return None

    def _built(self, machine: str, source: Source) -> Ready:
        assert source.build is not None
        parts = [source.build.command, source.build.output]
        for destination, local in source.build.inputs:
            empty = Source(name=source.name, type="file", origin=source.origin)
            parts += [destination, self._tree(empty, local, checksum=True).digest or ""]
        key = hashlib.sha256("\0".join(parts).encode()).hexdigest()
        stage = BuildStage(machine, source, key, self.state / "build" / machine / source.name)
        if stage.cached():
            return self._finished(stage)
        return Ready(source, None, None, source.checksum, stage)

    def built(self, item: Ready) -> Ready:
        """Run a pending build stage; the source is then ready. Raises BuildError."""
        assert item.stage is not None
        item.stage.run()
        return self._finished(item.stage)

    def _finished(self, stage: BuildStage) -> Ready:
        """A finished build's output, digested once: its directory never changes after the
        build, so the digest is kept beside it (`BuildStage.digest_memo`) and read back by the
        next runs, as long as the tree's manifest is kept too. (Listing a tree costs an rsync
        process: one a machine with a build, every run, without this.)"""
        source = stage.source
        memo = stage.digest_memo(hashlib.sha256(repr(source).encode()).hexdigest()[:16])
        with contextlib.suppress(OSError):
            digest = memo.read_text().strip()
            manifest = self._manifest(digest)
            if manifest.exists():
                manifest.touch()  # used now: see `prune_manifests`
                return Ready(source, digest, stage.output, source.checksum, stage)
        ready = replace(self._tree(source, stage.output, source.checksum), stage=stage)
        assert ready.digest is not None
        write_atomically(memo, ready.digest + "\n")
        return ready

    def _pipe(self, machine: str, source: Source) -> Ready:
        """Run the command now, so a failure stops the run before anything is copied."""
        directory = self.state / "pipe"
        directory.mkdir(parents=True, exist_ok=True)
        partial = directory / f"partial-{os.getpid()}-{machine}-{source.name}"
        command = f'( {source.command}\n) > "$FLAKEFLEET_OUTPUT"'
        result = run(
            ["sh", "-c", command],
            cwd=str(self.root),
            env={"FLAKEFLEET_MACHINE": machine, "FLAKEFLEET_OUTPUT": str(partial)},
            check=False,
        )
        if result.returncode != 0:
            partial.unlink(missing_ok=True)
            tail = " | ".join(line.strip() for line in result.stderr.strip().splitlines()[-2:])
            raise SourceError(
                machine,
                source.name,
                source.origin,
                f"command exited {result.returncode}: {tail or '(no output)'}",
                "command",
            )
        digest = source_digest(source, file_sha256(partial))
        final = directory / digest
        partial.chmod(source.mode)
        partial.replace(final)
        (directory / f"{digest}.used").touch()
        prune_unused(directory, keep={digest, f"{digest}.used"}, marker=".used")
        return Ready(source, digest, final, checksum=True)


def check_run(
    root: Path,
    machines: Sequence[tuple[str, Sequence[tuple[str, Mapping[str, Any]]], Any]],
    commands: bool = True,
) -> RunSources:
    """Check every machine's sources (name, data layers, its `MachineSettings`); raises
    SourcesInvalid with every machine's first problem. `commands`: see `RunSources`."""
    sources = RunSources(root, commands)
    sources.prune_manifests()
    errors = []
    for machine, found, settings in machines:
        try:
            sources.add(machine, found, settings)
        except SourceError as error:
            errors.append(error)
    if errors:
        raise SourcesInvalid(errors)
    return sources
