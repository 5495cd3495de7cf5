"""What the plan says a sync would change (flakefleet.sources.plan), from digests only."""

from __future__ import annotations

from pathlib import Path

from flakefleet.models import VarSrc
from flakefleet.sources import MachineSources, Ready, Source
from flakefleet.sources.plan import describe

MANIFESTS = {
    "old": {"flake.nix": "F644\0flake.nix\0a", "lib": "D755\0lib", "lib/a.nix": "F644\0x\0a",
            "gone.nix": "F644\0gone.nix\0a"},
    "new": {"flake.nix": "F644\0flake.nix\0b", "lib": "D755\0lib", "lib/a.nix": "F644\0x\0a",
            "lib/b.nix": "F644\0x\0b"},
}  # fmt: skip


def item(name: str, digest: str | None, kind: str = "file") -> Ready:
    return Ready(Source(name=name, type=kind, origin="group_data/all.py"), digest, Path("/x"))


def test_each_change_is_named_and_files_are_listed_from_the_manifests():
    wanted = MachineSources(
        machine="web1",
        sources=(item("config", "new"), item("notes", "n1"), item("token", None, "pipe"),
                 item("same", "s1")),
    )  # fmt: skip
    var_src = VarSrc(
        exists=True, managed=True,
        sources={"config": "old", "same": "s1", "retired": "r1", "foreign": None},
    )  # fmt: skip
    assert describe(wanted, var_src, MANIFESTS.get) == [
        "config: 1 changed (flake.nix), 1 added (lib/b.nix), 1 removed (gone.nix)",
        "notes: new",
        "token: unknown (its command runs only in a deploy)",
        "retired: removed (no longer declared)",
    ]
    # Without the old tree's manifest (digested on another controller): only that it changed.
    assert describe(wanted, var_src, lambda d: None)[0] == "config: changed"
