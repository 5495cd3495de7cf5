"""The sync's decisions and its remote half: the `Sources` fact, the plan, the guard, and the
install script, run for real with sh on a local directory. (What rsync sends, with which
options, as which user, is checked on the test fleet: tests/integration/test_sources.py and
test_sudo.py.)"""

from __future__ import annotations

import subprocess
from pathlib import Path

from facts.sources import Sources
from flakefleet.models import VarSrc
from flakefleet.sources import MachineSources, Ready, Source
from operations.sources import Changes, changes_for, guard, install_script, tree_name

D1, D2 = "1" * 64, "2" * 64


def ready(name: str, digest: str | None, kind: str = "file", **fields) -> Ready:
    local = fields.pop("local", None)
    return Ready(Source(name=name, type=kind, origin="test", **fields), digest, local)


def machine(*items: Ready, **settings) -> MachineSources:
    return MachineSources("web1", tuple(items), **settings)


# ----------------------------------------------------------------------------- the fact


def test_fact_reads_root_links_resynced_trees_and_stored_directories():
    state = Sources().process(
        [
            "root /var/lib/deploy/.var/src",
            "exists",
            "managed",
            f"source config .flakefleet/config/{D1}",
            f"source app .flakefleet/app/{D2}.1700000000",
            "source notes ",
            "source other ../elsewhere",
            "stored config",
            "stored app",
            "stored half",
        ]
    )
    assert state.root == "/var/lib/deploy/.var/src"
    assert state.sources == {"config": D1, "app": D2, "notes": None, "other": None}
    assert state.live == {"config": D1, "app": f"{D2}.1700000000"}
    assert state.stored == {"config", "app", "half"}
    assert not state.empty


def test_fact_command_runs_and_reads_a_missing_root():
    output = subprocess.run(
        ["sh", "-c", Sources().command()], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert output[0].startswith("root ")


# ----------------------------------------------------------------------------- plan, guard


def test_nothing_to_do_when_every_digest_matches():
    var_src = VarSrc(True, True, {"config": D1}, live={"config": D1}, stored=frozenset({"config"}))
    assert not changes_for([ready("config", D1)], var_src, machine())


def test_plan_installs_changes_removes_stale_and_orphans_and_keeps_foreign():
    var_src = VarSrc(
        True,
        True,
        {"config": D1, "old": D1, "mine": None},
        live={"config": D1, "old": D1},
        stored=frozenset({"config", "old", "half", "new"}),
    )
    items = [ready("config", D2), ready("new", D1)]
    changes = changes_for(items, var_src, machine())
    assert [(item.source.name, tree) for item, tree in changes.install] == [
        ("config", D2),
        ("new", D1),
    ]
    assert changes.remove == ("old",)
    assert changes.orphans == ("half",)  # "new" is declared: its partial tree may be resumed
    kept = changes_for(items, var_src, machine(keep_undeclared=True))
    assert kept.remove == ()


def test_resync_rebuilds_under_a_new_name():
    var_src = VarSrc(True, True, {"config": D1}, live={"config": D1})
    changes = changes_for([ready("config", D1)], var_src, machine(resync=True))
    assert changes.install[0][1].startswith(f"{D1}.")
    assert tree_name(D1, f"{D1}.5") == D1


def test_guard_protects_another_tools_tree_unless_forced():
    krops = VarSrc(exists=True, managed=False, sources={"nixpkgs": None})
    reason = guard(machine(ready("config", D1)), krops)
    assert reason is not None and "no flakefleet marker (/var/src/.flakefleet)" in reason
    assert guard(machine(ready("config", D1), force=True), krops) is None
    assert guard(machine(ready("config", D1)), VarSrc(exists=True, empty=True)) is None
    assert guard(machine(ready("config", D1)), VarSrc()) is None
    foreign = VarSrc(True, True, {"notes": None})
    reason = guard(machine(ready("notes", D1)), foreign)
    assert reason == (
        "/var/src/notes exists and was not put there by flakefleet "
        "(--data sources_force=true moves it aside)"
    )


# ----------------------------------------------------------------------------- install script


def run_script(changes: Changes, root: Path, undo: str | None = None) -> None:
    subprocess.run(["sh", "-c", install_script(changes, str(root), undo)], check=True)


def test_install_script_swaps_links_removes_and_displaces(tmp_path):
    root = tmp_path / "src"
    store = root / ".flakefleet"
    for name, tree in (("app", D1), ("old", D1)):
        (store / name / tree).mkdir(parents=True)
        (root / name).symlink_to(f".flakefleet/{name}/{tree}")
    (store / "app" / f"{D2}.partial").mkdir()
    (store / "app" / f"{D2}.partial" / "index.html").write_text("new")
    (store / "half" / "x.partial").mkdir(parents=True)
    (root / "notes").mkdir()  # another tool's
    changes = Changes(
        install=(
            (ready("app", D2, local=tmp_path), D2),
            (ready("notes", D1, kind="symlink", target="app"), D1),
        ),
        remove=("old",),
        orphans=("half",),
        displace=("notes",),
    )
    undo = store / ".undo" / "run1"
    run_script(changes, root, str(undo))
    assert (root / "app").readlink() == Path(f".flakefleet/app/{D2}")
    assert (root / "app" / "index.html").read_text() == "new"
    # The tree it replaced stays, for a rollback to link again; nothing older does.
    assert sorted(p.name for p in (store / "app").iterdir()) == [D1, D2]
    assert (root / "notes" / "index.html").read_text() == "new"  # symlink -> /var/src/app
    assert (store / "notes" / D1).readlink() == Path("../../app")
    assert [p.name.split(".")[0] for p in (store / ".displaced").iterdir()] == ["notes"]
    assert not (root / "old").exists() and (store / "old" / D1).is_dir()  # kept, unlinked
    assert not (store / "half").exists()
    assert sorted(p.name for p in root.iterdir()) == [".flakefleet", "app", "notes"]
    # What a rollback of this deploy puts back: app's old tree, old's link, no notes of ours.
    assert undo.read_text().splitlines() == [f"app {D1}", "notes -", f"old {D1}"]


def test_install_script_stops_at_the_first_failure(tmp_path):
    root = tmp_path / "src"
    changes = Changes(install=((ready("app", D2, local=tmp_path), D2),))  # no partial tree sent
    completed = subprocess.run(
        ["sh", "-c", install_script(changes, str(root))], capture_output=True, text=True
    )
    assert completed.returncode != 0
    assert not (root / "app").exists()
