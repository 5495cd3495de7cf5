"""Where sources are declared (pyinfra's data layers), how the layers merge, and the
checks each source gets before anything is copied."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from flakefleet.sources.model import (
    BUILD_FIELDS,
    CONFIG,
    CONFIG_EXCLUDES,
    FIELDS,
    NAME_PATTERN,
    TYPES,
    Build,
    Source,
    SourceError,
)


@dataclass
class Declared:
    """A source's merged fields and the layer each field came from (`*`: the last layer)."""

    spec: dict[str, Any]
    origins: dict[str, str] = field(default_factory=dict)

    def origin(self, field_name: str | None = None) -> str:
        return self.origins.get(field_name or "*", self.origins.get("*", "?"))


def merge(machine: str, found: Sequence[tuple[str, Mapping[str, Any]]]) -> dict[str, Declared]:
    """Merge the layers' `sources` mappings (see the module docstring for the rules)."""
    merged: dict[str, Declared] = {}
    for label, data in found:
        declared = data.get("sources")
        if declared is None:
            continue
        if not isinstance(declared, Mapping):
            raise SourceError(machine, None, label, "expected a mapping of names to sources")
        for name, spec in declared.items():
            filters_only = isinstance(spec, Mapping) and set(spec) <= CONFIG_FILTERS
            if name == CONFIG and label != CONFIG_LABEL and not filters_only:
                raise SourceError(
                    machine,
                    CONFIG,
                    label,
                    f"'{CONFIG}' is the flake: `sources` may only add "
                    f"{', '.join(sorted(CONFIG_FILTERS))} to it; set `flake` to change it",
                )
            if spec is None:
                merged.pop(name, None)
                continue
            if not isinstance(spec, Mapping):
                raise SourceError(machine, str(name), label, "expected a mapping of fields")
            earlier = merged.get(name)
            same_type = earlier is not None and spec.get("type", earlier.spec.get("type")) == (
                earlier.spec.get("type")
            )
            if earlier is not None and same_type:
                earlier.spec.update(spec)
                earlier.origins.update({key: label for key in spec} | {"*": label})
            else:
                merged[name] = Declared(dict(spec), {key: label for key in spec} | {"*": label})
    return merged


CONFIG_LABEL = "data key 'flake'"
# What a layer may change in the flake's source: which of its files are sent, and how compared.
CONFIG_FILTERS = frozenset({"include", "exclude", "checksum"})


def config_layer(flake: str | None) -> list[tuple[str, Mapping[str, Any]]]:
    """The flake as the source `config`, below every declared layer (so a group may add
    filters to it)."""
    if not flake:
        return []
    spec = {"type": "file", "path": flake, "exclude": list(CONFIG_EXCLUDES), "checksum": True}
    return [(CONFIG_LABEL, {"sources": {CONFIG: spec}})]


def parse(machine: str, name: Any, declared: Declared, root: Path) -> Source:
    """Check one merged declaration and fill in `{machine}`; relative paths are relative to
    `root` (the repository). Raises SourceError naming the field."""
    origin = declared.origin()
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name:
        raise SourceError(
            machine,
            str(name),
            origin,
            f"{name!r} is not a plain file name (letters, digits, '.', '_', '+', '-'; "
            "not starting with '.'; no '..')",
        )
    spec = _fill(declared.spec, machine)
    kind = spec.get("type")
    if kind not in TYPES:
        raise SourceError(
            machine,
            name,
            declared.origin("type"),
            f"unknown type {kind!r} (expected one of: {', '.join(TYPES)})",
            "type",
        )
    for key in spec:
        if key not in FIELDS[kind]:
            raise SourceError(
                machine,
                name,
                declared.origin(key),
                f"unknown field {key!r} for a {kind} source "
                f"(expected one of: {', '.join(FIELDS[kind])})",
                key,
            )
    check = _Checker(machine, name, declared, spec)
    return _PARSERS[kind](check, Source(name=name, type=kind, origin=origin), root)


def _parse_file(check: _Checker, source: Source, root: Path) -> Source:
    build = _parse_build(check, check.spec.get("build"), root)
    if build and "path" in check.spec:
        check.fail("path", "give either 'path' or 'build', not both")
    return replace(
        source,
        path=None if build else _local_path(check, "path", root),
        include=check.strings("include"),
        exclude=check.strings("exclude"),
        # A build writes every file anew: only content tells whether its output changed.
        checksum=check.boolean("checksum", default=build is not None),
        build=build,
    )


def _parse_git(check: _Checker, source: Source, root: Path) -> Source:
    ref = check.text("ref")
    if ref.startswith("-") or any(c.isspace() for c in ref):
        check.fail("ref", f"{ref!r} is not a git ref")
    url = _git_url(check.text("url"), root)
    return replace(source, url=url, ref=ref, submodules=check.boolean("submodules"))


def _parse_symlink(check: _Checker, source: Source, root: Path) -> Source:
    return replace(source, target=check.text("target"))


def _parse_pipe(check: _Checker, source: Source, root: Path) -> Source:
    return replace(source, command=check.text("command"), mode=check.mode("mode"))


def _parse_derivation(check: _Checker, source: Source, root: Path) -> Source:
    expression, flake = check.spec.get("expression"), check.spec.get("flake")
    if (expression is None) == (flake is None):
        check.fail(None, "give exactly one of 'expression' (a Nix expression) or 'flake'")
    key = "expression" if expression is not None else "flake"
    return replace(source, **{key: check.text(key)})


def _fill(value: Any, machine: str) -> Any:
    """`{machine}` replaced in every string of a declaration."""
    if isinstance(value, str):
        return value.replace("{machine}", machine)
    if isinstance(value, Mapping):
        return {_fill(key, machine): _fill(item, machine) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_fill(item, machine) for item in value]
    return value


@dataclass
class _Checker:
    """Typed access to a declaration's fields, failing with the field's origin."""

    machine: str
    name: str
    declared: Declared
    spec: Mapping[str, Any]

    def fail(self, key: str | None, problem: str) -> None:
        raise SourceError(self.machine, self.name, self.declared.origin(key), problem, key)

    def text(self, key: str) -> str:
        value = self.spec.get(key)
        if not isinstance(value, str) or not value.strip():
            self.fail(key, "missing" if value is None else f"expected a string, not {value!r}")
        return str(value)

    def strings(self, key: str) -> tuple[str, ...]:
        value = self.spec.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.fail(key, f"expected a list of patterns, not {value!r}")
        return tuple(value)

    def boolean(self, key: str, default: bool = False) -> bool:
        value = self.spec.get(key, default)
        if not isinstance(value, bool):
            self.fail(key, f"expected true or false, not {value!r}")
        return bool(value)

    def mode(self, key: str) -> int:
        value = self.spec.get(key, "0644")
        if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3}", value):
            return int(value, 8)
        self.fail(key, f"expected a file mode such as '0644', not {value!r}")
        return 0


def _local_path(check: _Checker, key: str, root: Path) -> Path:
    path = root / check.text(key)
    if not path.exists():
        check.fail(key, f"{check.spec[key]!r} does not exist ({path})")
    return path


def _parse_build(check: _Checker, value: Any, root: Path) -> Build | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        check.fail("build", "expected a mapping with inputs, command and output")
    for key in value:
        if key not in BUILD_FIELDS:
            check.fail(
                "build", f"unknown build field {key!r} (expected: {', '.join(BUILD_FIELDS)})"
            )
    inputs = value.get("inputs")
    if not isinstance(inputs, Mapping) or not inputs:
        check.fail("build", "'inputs' must map destinations in the build directory to local paths")
    resolved = []
    for destination, local in dict(inputs).items():
        if not isinstance(destination, str) or not _relative(destination, allow_dot=True):
            check.fail("build", f"input destination {destination!r} is not a relative path")
        if not isinstance(local, str) or not (root / local).exists():
            check.fail("build", f"input {destination!r}: {local!r} does not exist ({root / local})")
        resolved.append((destination, root / local))
    command, output = value.get("command"), value.get("output")
    if not isinstance(command, str) or not command.strip():
        check.fail("build", "'command' must be a shell command")
    if not isinstance(output, str) or not _relative(output, allow_dot=False):
        check.fail("build", "'output' must be a relative path in the build directory")
    resolved.sort(key=lambda item: (item[0] != ".", item[0].count("/"), item[0]))
    return Build(tuple(resolved), str(command), str(output))


def _relative(path: str, allow_dot: bool) -> bool:
    parts = Path(path).parts
    return (
        bool(path)
        and not path.startswith("/")
        and ".." not in parts
        and (allow_dot or path not in (".", "./"))
    )


def _git_url(url: str, root: Path) -> str:
    """A URL as given, or a local repository path made absolute (relative to `root`)."""
    if "://" in url or re.match(r"[^/]+:", url):
        return url
    return str((root / url).resolve())


_PARSERS = {
    "file": _parse_file,
    "git": _parse_git,
    "symlink": _parse_symlink,
    "pipe": _parse_pipe,
    "derivation": _parse_derivation,
}
