"""Source declarations: merging, checks, digests, git, pipes and the local build stage.

Local only (real rsync, git and sh on the controller); the fleet is in tests/integration.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from flakefleet.nix import flake_reference, tracked_files
from flakefleet.settings import MachineSettings
from flakefleet.sources import (
    BuildError,
    GitCache,
    RunSources,
    SourceError,
    SourcesInvalid,
    check_run,
    config_layer,
    digests,
    list_tree,
    merge,
    only_rules,
    parse,
    tree_digest,
)


def layer(label: str, **sources: object) -> tuple[str, dict]:
    return (label, {"sources": sources})


def parse_one(tmp_path: Path, spec: dict, name: str = "src", machine: str = "web1"):
    declared = merge(machine, [layer("group_data/web.py", **{name: spec})])
    return parse(machine, name, declared[name], tmp_path)


def problem(tmp_path: Path, spec: dict, name: str = "src") -> str:
    with pytest.raises(SourceError) as caught:
        parse_one(tmp_path, spec, name)
    return str(caught.value)


# ----------------------------------------------------------------------------- merging


def test_later_layers_add_override_field_by_field_and_remove():
    merged = merge(
        "web1",
        [
            layer("group_data/all.py", notes={"type": "file", "path": "notes"}, gone={"type": "x"}),
            layer("group_data/web.py", app={"type": "git", "url": "u", "ref": "main"}),
            layer("fleet.yaml", app={"ref": "v2"}, gone=None),
        ],
    )
    assert sorted(merged) == ["app", "notes"]
    assert merged["app"].spec == {"type": "git", "url": "u", "ref": "v2"}
    assert merged["app"].origin("url") == "group_data/web.py"
    assert merged["app"].origin("ref") == "fleet.yaml"
    assert merged["app"].origin() == "fleet.yaml"


def test_a_new_type_replaces_the_lower_declaration():
    merged = merge(
        "web1",
        [
            layer("group_data/all.py", app={"type": "git", "url": "u", "ref": "main"}),
            layer("--data", app={"type": "symlink", "target": "config"}),
        ],
    )
    assert merged["app"].spec == {"type": "symlink", "target": "config"}


def test_the_flake_is_config_and_a_group_may_filter_it():
    merged = merge(
        "web1",
        [*config_layer("example"), layer("group_data/all.py", config={"exclude": ["*.md"]})],
    )
    assert merged["config"].spec["path"] == "example"
    assert merged["config"].spec["exclude"] == ["*.md"]


def test_machine_placeholder_is_filled_in(tmp_path):
    (tmp_path / "machines" / "web1").mkdir(parents=True)
    source = parse_one(tmp_path, {"type": "file", "path": "machines/{machine}"})
    assert source.path == tmp_path / "machines" / "web1"


# ----------------------------------------------------------------------------- bad input


def test_unknown_type(tmp_path):
    assert problem(tmp_path, {"type": "fiel", "path": "."}) == (
        "web1: source 'src' (group_data/web.py, field 'type'): unknown type 'fiel' "
        "(expected one of: file, git, symlink, pipe, derivation)"
    )


def test_missing_local_path_names_the_field_and_the_full_path(tmp_path):
    assert problem(tmp_path, {"type": "file", "path": "nope"}) == (
        f"web1: source 'src' (group_data/web.py, field 'path'): 'nope' does not exist "
        f"({tmp_path / 'nope'})"
    )


@pytest.mark.parametrize("name", ["a/b", "..", "a..b", ".hidden", "", "with space"])
def test_names_must_be_plain_file_names(tmp_path, name):
    message = problem(tmp_path, {"type": "symlink", "target": "config"}, name=name)
    assert message.startswith(f"web1: source {name!r} (group_data/web.py): ")
    assert "is not a plain file name" in message


def test_unknown_field_and_wrong_field_type(tmp_path):
    assert "unknown field 'pth' for a file source" in problem(
        tmp_path, {"type": "file", "pth": "x"}
    )
    assert "field 'checksum'): expected true or false" in problem(
        tmp_path, {"type": "file", "path": ".", "checksum": "yes"}
    )
    assert "field 'mode'): expected a file mode" in problem(
        tmp_path, {"type": "pipe", "command": "true", "mode": "rw"}
    )
    assert "exactly one of 'expression'" in problem(
        tmp_path, {"type": "derivation", "expression": "1", "flake": "x#y"}
    )


def test_build_inputs_must_exist(tmp_path):
    spec = {"type": "file", "build": {"inputs": {".": "app"}, "command": "true", "output": "dist"}}
    assert "field 'build'): input '.': 'app' does not exist" in problem(tmp_path, spec)


def test_every_machines_first_problem_is_reported_once_per_problem(tmp_path):
    bad = {"sources": {"x": {"type": "file", "path": "missing"}}}
    with pytest.raises(SourcesInvalid) as caught:
        check_run(
            tmp_path,
            [
                ("web1", [("group_data/web.py", bad)], MachineSettings()),
                ("web2", [("group_data/web.py", bad)], MachineSettings()),
            ],
        )
    assert caught.value.lines == [
        f"web1, web2: source 'x' (group_data/web.py, field 'path'): 'missing' does not exist "
        f"({tmp_path / 'missing'})"
    ]


# ----------------------------------------------------------------------------- digests


def make_tree(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("a")
    (root / "sub" / "b.txt").write_text("b")
    (root / "skip.log").write_text("log")
    (root / "link").symlink_to("a.txt")
    return root


def digest(root: Path, checksum: bool = True, exclude: tuple[str, ...] = ()) -> str:
    empty = root.parent / "empty"
    empty.mkdir(exist_ok=True)
    return tree_digest(root, list_tree(root, (), exclude, empty), checksum)


def test_listing_is_what_rsync_sends(tmp_path):
    root = make_tree(tmp_path / "t")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert list_tree(root, (), ("*.log",), empty) == ["a.txt", "link", "sub", "sub/b.txt"]
    assert list_tree(root, ("*/", "*.txt"), ("*",), empty) == ["a.txt", "sub", "sub/b.txt"]
    assert list_tree(root / "a.txt", (), (), empty) == [""]


def test_a_flake_in_git_sends_what_nix_takes_the_files_git_tracks(tmp_path):
    repo = tmp_path / "repo"
    flake = repo / "fleet"
    (flake / "lib").mkdir(parents=True)
    (flake / "empty-untracked").mkdir()
    for name in ("flake.nix", "lib/a.nix", "odd [x]*?.nix", "gone.nix"):
        (flake / name).write_text(name)
    (repo / "outside.txt").write_text("not the flake's directory")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    (flake / "gone.nix").unlink()  # tracked, deleted: Nix takes what exists
    (flake / "secret.txt").write_text("untracked")
    (flake / "lib" / "result").symlink_to("/nix/store")
    (flake / "staged.nix").write_text("staged")
    subprocess.run([*git, "add", "fleet/staged.nix"], check=True)

    files = tracked_files(flake)
    assert files == ["flake.nix", "lib/a.nix", "odd [x]*?.nix", "staged.nix"]
    empty = tmp_path / "empty"
    empty.mkdir()
    rules = tmp_path / "rules"
    rules.write_text(only_rules(files))
    assert list_tree(flake, (), (), empty, rules) == ["flake.nix", "lib", "lib/a.nix",
                                                       "odd [x]*?.nix", "staged.nix"]  # fmt: skip
    assert flake_reference(flake) == f"git+file://{repo}?dir=fleet"
    # Outside git, Nix takes the whole directory (`path:`), and so does the sync.
    shutil.rmtree(repo / ".git")
    assert tracked_files(flake) is None
    assert flake_reference(flake) == f"path:{flake}"


def test_digest_follows_content_links_modes_and_filters(tmp_path):
    root = make_tree(tmp_path / "t")
    seen = {digest(root)}
    (root / "sub" / "b.txt").write_text("B")
    seen.add(digest(root))
    (root / "link").unlink()
    (root / "link").symlink_to("sub")
    seen.add(digest(root))
    (root / "a.txt").chmod(0o755)
    seen.add(digest(root))
    assert len(seen) == 4
    before = digest(root, exclude=("*.log",))
    (root / "skip.log").write_text("changed, but excluded")
    assert digest(root, exclude=("*.log",)) == before


def test_quick_check_digest_sees_time_and_size_but_not_same_size_rewrites_at_same_time(tmp_path):
    root = make_tree(tmp_path / "t")
    by_time = digest(root, checksum=False)
    stat = (root / "a.txt").stat()
    (root / "a.txt").write_text("z")  # same size
    os.utime(root / "a.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert digest(root, checksum=False) == by_time  # exactly rsync's quick check
    assert digest(root, checksum=True) != digest(make_tree(tmp_path / "u"), checksum=True)
    os.utime(root / "a.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert digest(root, checksum=False) != by_time  # nanoseconds count


# ----------------------------------------------------------------------------- git


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
        env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
             "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"},
    ).stdout.strip()  # fmt: skip


def make_repo(path: Path, content: str) -> str:
    path.mkdir(parents=True)
    git("init", "--quiet", "--initial-branch=main", cwd=path)
    (path / "README").write_text(content)
    git("add", "README", cwd=path)
    git("commit", "--quiet", "-m", content, cwd=path)
    return git("rev-parse", "HEAD", cwd=path)


def test_git_refs_resolve_on_the_controller(tmp_path):
    first = make_repo(tmp_path / "repo", "one")
    git("tag", "v1", cwd=tmp_path / "repo")
    (tmp_path / "repo" / "README").write_text("two")
    git("commit", "--quiet", "-am", "two", cwd=tmp_path / "repo")
    second = git("rev-parse", "HEAD", cwd=tmp_path / "repo")
    cache = GitCache(tmp_path / "cache")
    url = str(tmp_path / "repo")
    assert cache.commit(url, "main") == second
    assert cache.commit(url, "v1") == first
    assert cache.commit(url, first) == first
    with pytest.raises(Exception, match="ref 'nope' does not exist in"):
        cache.commit(url, "nope")
    with pytest.raises(Exception, match=r"cannot fetch /nonexistent: fatal: .*"):
        cache.commit("/nonexistent", "main")


def test_git_checkout_has_the_commit_submodules_and_fixed_times(tmp_path):
    make_repo(tmp_path / "lib", "library")
    top = tmp_path / "top"
    make_repo(top, "top")
    git("-c", "protocol.file.allow=always", "submodule", "add", "--quiet",
        str(tmp_path / "lib"), "lib", cwd=top)  # fmt: skip
    git("commit", "--quiet", "-m", "sub", cwd=top)
    commit = git("rev-parse", "HEAD", cwd=top)
    cache = GitCache(tmp_path / "cache")
    tree = cache.checkout(f"file://{top}", cache.commit(f"file://{top}", "main"), True)
    assert {p.lstat().st_mtime for p in tree.rglob("*")} == {1}  # before git touches .git
    assert (tree / "lib" / "README").read_text() == "library"
    assert git("rev-parse", "HEAD", cwd=tree) == commit
    assert git("status", "--porcelain", cwd=tree) == ""
    without = cache.checkout(f"file://{top}", commit, False)
    assert not (without / "lib" / "README").exists()


# ----------------------------------------------------------------------------- pipes, builds


def run_sources(tmp_path: Path, machine: str, sources: dict) -> RunSources:
    return check_run(
        tmp_path, [(machine, [("group_data/all.py", {"sources": sources})], MachineSettings())]
    )


def test_pipe_output_becomes_a_file_with_its_mode(tmp_path):
    checked = run_sources(
        tmp_path,
        "web1",
        {
            "hosts": {
                "type": "pipe",
                "command": "echo $FLAKEFLEET_MACHINE; printf '\\377'",
                "mode": "0600",
            }
        },
    )
    item = checked.machines["web1"].sources[0]
    assert item.local is not None and item.local.read_bytes() == b"web1\n\xff"
    assert item.local.stat().st_mode & 0o777 == 0o600


def test_a_failing_pipe_command_is_bad_input(tmp_path):
    with pytest.raises(SourcesInvalid) as caught:
        run_sources(tmp_path, "web1", {"gen": {"type": "pipe", "command": "echo oops >&2; exit 3"}})
    assert caught.value.lines == [
        "web1: source 'gen' (group_data/all.py, field 'command'): command exited 3: oops"
    ]


def build_spec(command: str) -> dict:
    return {
        "type": "file",
        "build": {
            "inputs": {".": "app", ".env": "machines/{machine}.env"},
            "command": command,
            "output": "dist",
        },
    }


def make_app(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "page.in").write_text("hello NAME\n")
    (tmp_path / "machines").mkdir()
    (tmp_path / "machines" / "web1.env").write_text("NAME=web1\n")


def test_build_runs_once_per_input_content(tmp_path):
    make_app(tmp_path)
    command = (
        ". ./.env; mkdir dist; sed s/NAME/$NAME/ page.in > dist/index.html; "
        "echo built >> ../../count"
    )
    checked = run_sources(tmp_path, "web1", {"site": build_spec(command)})
    item = checked.machines["web1"].sources[0]
    assert item.digest is None and item.stage is not None  # pending: built at execute time
    built = checked.built(item)
    assert built.local is not None and (built.local / "index.html").read_text() == "hello web1\n"
    again = run_sources(tmp_path, "web1", {"site": build_spec(command)}).machines["web1"]
    assert again.pending_builds() == [] and again.sources[0].digest == built.digest
    (tmp_path / "machines" / "web1.env").write_text("NAME=other\n")
    assert (
        run_sources(tmp_path, "web1", {"site": build_spec(command)})
        .machines["web1"]
        .pending_builds()
    )
    count = tmp_path / ".flakefleet" / "build" / "web1" / "count"
    assert count.read_text() == "built\n"


def test_a_finished_build_is_listed_once_and_its_digest_read_back(tmp_path, monkeypatch):
    make_app(tmp_path)
    command = ". ./.env; mkdir dist; sed s/NAME/$NAME/ page.in > dist/index.html"
    checked = run_sources(tmp_path, "web1", {"site": build_spec(command)})
    built = checked.built(checked.machines["web1"].sources[0])
    listed: list[str] = []
    real = digests.run

    def counting(argv, **kwargs):
        listed.append(argv[-2])
        return real(argv, **kwargs)

    monkeypatch.setattr(digests, "run", counting)
    again = run_sources(tmp_path, "web1", {"site": build_spec(command)}).machines["web1"]
    assert again.sources[0].digest == built.digest
    assert f"{built.local}/" not in listed  # read back, not listed again
    assert f"{tmp_path / 'app'}/" in listed  # the inputs are: they may change
    # Its manifest forgotten (pruned), the output is listed again: the digest comes back whole.
    manifests = tmp_path / ".flakefleet" / "manifests"
    for manifest in manifests.iterdir():
        manifest.unlink()
    listed.clear()
    third = run_sources(tmp_path, "web1", {"site": build_spec(command)}).machines["web1"]
    assert third.sources[0].digest == built.digest and f"{built.local}/" in listed
    assert (manifests / f"{built.digest}.json").exists()


def test_a_failed_build_says_why_and_leaves_no_result(tmp_path):
    make_app(tmp_path)
    checked = run_sources(
        tmp_path, "web1", {"site": build_spec("echo compiling; echo 'bad token' >&2; exit 2")}
    )
    with pytest.raises(BuildError) as caught:
        checked.built(checked.machines["web1"].sources[0])
    assert "build failed (exited 2): compiling | bad token" in str(caught.value)
    assert "bad token" in caught.value.output
    stage = checked.machines["web1"].sources[0].stage
    assert stage is not None and not stage.cached()


@pytest.mark.parametrize(
    "change",
    [None, {"type": "symlink", "target": "/etc"}, {"path": "elsewhere"}],
    ids=["removed", "replaced", "moved"],
)
def test_the_flake_source_cannot_be_changed_through_sources(tmp_path, change):
    layers = [*config_layer("."), ("--data", {"sources": {"config": change}})]
    with pytest.raises(SourcesInvalid) as caught:
        check_run(tmp_path, [("web1", layers, MachineSettings())])
    assert caught.value.lines == [
        "web1: source 'config' (--data): 'config' is the flake: `sources` may only add "
        "checksum, exclude, include to it; set `flake` to change it"
    ]


def test_a_group_may_still_filter_the_flake(tmp_path):
    layers = [
        *config_layer("."),
        ("group_data/all.py", {"sources": {"config": {"exclude": ["x"]}}}),
    ]
    checked = check_run(tmp_path, [("web1", layers, MachineSettings())])
    (config,) = checked.machines["web1"].sources
    assert "x" in config.source.exclude
