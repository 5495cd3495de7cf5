"""Deploy records: what happened, kept where it happened.

On each machine, the activation worker appends one JSON object a line to the machine's deploy
history (`Target.history`: /var/lib/flakefleet/history.jsonl, root's only) when an activation
ends: when, the outcome and its message, the goal, the system, the generation it made or
selected, the sources it runs with, and the deployer's fields below (who, from which
revision). A rollback to a generation reads the sources back from there (by way of the
worker's own index, see ``operations/scripts/activate.sh``).

On the controller, every run appends one JSON line per machine to
``.flakefleet/runs/<UTC date>.jsonl``: the run, the machine's outcome (as in the summary) and
what flakefleet sent it (`Target.tally`).
"""

from __future__ import annotations

import getpass
import json
import socket
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flakefleet.nix import flake_revision

RUNS = ".flakefleet/runs"  # under the repository


def deployer_fields(run_id: str, flake: Path) -> str:
    """The deployer's part of a machine's record, as JSON members (no braces): the run, who
    ran it from where, and the flake's revision (its git commit, and whether files git tracks
    had uncommitted changes; no revision outside git). Nothing secret: it is on a command
    line."""
    revision, dirty = flake_revision(flake)
    fields = {
        "run": run_id,
        "by": f"{getpass.getuser()}@{socket.gethostname()}",
        "revision": revision,
        "dirty": dirty,
    }
    return json.dumps(fields, separators=(",", ":"))[1:-1]


@dataclass(frozen=True)
class Entry:
    """One line of a machine's deploy history."""

    time: str
    outcome: str
    message: str
    goal: str
    system: str
    generation: int | None
    sources: dict[str, str] = field(default_factory=dict)
    run: str = ""
    by: str = ""
    revision: str | None = None
    dirty: bool = False

    @classmethod
    def parse(cls, line: str) -> Entry | None:
        """An entry, or None for a line that is not one (a torn write, another version)."""
        try:
            data = json.loads(line)
            return cls(
                time=str(data["time"]),
                outcome=str(data["outcome"]),
                message=str(data.get("message", "")),
                goal=str(data.get("goal", "")),
                system=str(data.get("system", "")),
                generation=data.get("generation"),
                sources={str(k): str(v) for k, v in (data.get("sources") or {}).items()},
                run=str(data.get("run", "")),
                by=str(data.get("by", "")),
                revision=data.get("revision"),
                dirty=bool(data.get("dirty", False)),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


def parse_history(text: str) -> list[Entry]:
    """Every readable entry of a history, oldest first."""
    entries = (Entry.parse(line) for line in text.splitlines() if line.strip())
    return [entry for entry in entries if entry is not None]


def deployed(entries: list[Entry], system: str) -> Entry | None:
    """The newest entry that left `system` running (or set for the next boot); a dry
    activation changed nothing."""
    for entry in reversed(entries):
        if entry.system == system and entry.outcome == "succeeded" and entry.goal != "dry-activate":
            return entry
    return None


def write_run(
    directory: Path, run_id: str, started: float, lines: dict[str, dict[str, Any]]
) -> Path:
    """Append one JSON line per machine to the controller's run records
    (``<directory>/<UTC date>.jsonl``); returns the file."""
    directory.mkdir(parents=True, exist_ok=True)
    now = time.time()
    path = directory / f"{datetime.fromtimestamp(now, UTC):%Y-%m-%d}.jsonl"
    common = {
        "run": run_id,
        "started": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
        "seconds": round(now - started, 2),
        "by": f"{getpass.getuser()}@{socket.gethostname()}",
    }
    with path.open("a") as stream:
        for machine, fields in sorted(lines.items()):
            stream.write(json.dumps({**common, "machine": machine, **fields}) + "\n")
    return path
