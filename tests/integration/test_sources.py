"""Sources on the test fleet: every type, per-machine overrides, the local build stage, stale
sources, the guard, a sync killed mid-transfer, and bad input, with real rsync, ssh, git, Nix
and pyinfra.

The tests run in order on one fleet; each starts from the state the previous one left. Most
deploys use the `build` goal (no activation): the sources step is the same for every goal.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import BIN, ROOT

WEB = ("--limit", "web1", "--limit", "web2")
EVERY_CLASS = (*WEB, "--limit", "mac1", "--limit", "home1")
BUILD = ("--data", "goal=build")
ROOTS = {"home1": "/var/lib/deploy/.var/src"}  # a login without root keeps them in its home
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "protocol.file.allow=always"]


def root(machine: str) -> str:
    return ROOTS.get(machine, "/var/src")


def sources_data(sources: dict) -> tuple[str, str]:
    return ("--data", f"sources={json.dumps(sources)}")


def git_there(fleet, machine: str, checkout: str, *args: str) -> str:
    """`git ARGS` on a machine's checkout, run here on a copy of it: a machine needs no git
    (a NixOS server or a systemd test machine has none)."""
    with tempfile.TemporaryDirectory() as copy:
        subprocess.run(
            ["rsync", "-a", "-e", f"ssh -F {fleet.state / 'ssh_config'}",
             f"{machine}:{checkout}/", f"{copy}/"],
            check=True, capture_output=True,
        )  # fmt: skip
        return subprocess.run(
            ["git", "-c", "safe.directory=*", "-C", copy, *args],
            check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip


def read(fleet, machine: str, **commands: str) -> dict[str, str]:
    """Several commands' outputs from one machine over one SSH connection, by name."""
    script = "; ".join(
        f"echo @@{name}; {{ {command}; }} 2>&1" for name, command in commands.items()
    )
    found: dict[str, list[str]] = {}
    current: list[str] = []
    for line in fleet.ssh(machine, script, check=False).splitlines():
        if line.startswith("@@"):
            current = found.setdefault(line[2:], [])
        else:
            current.append(line)
    return {name: "\n".join(lines).strip() for name, lines in found.items()}


def hash_command(path: str, excluded: str = "") -> str:
    """A shell command hashing the names and contents of every file under a path."""
    return (
        f"cd {path}/ && find . -type f {excluded} -print0 | sort -z | xargs -0 -r sha256sum"
        " | sha256sum | cut -d' ' -f1"
    )


def local_tree_hash(path: Path, excluded: str = "") -> str:
    return subprocess.run(
        ["sh", "-c", hash_command(".", excluded)], cwd=path, capture_output=True, text=True,
        check=True,
    ).stdout.strip()  # fmt: skip


def count(fleet, machine: str, what: str) -> int:
    """How often the machine's sshd logged `what` so far ("Accepted publickey": connections)."""
    return (fleet.state / "machines" / machine / "console.log").read_text().count(what)


def result_row(output: str, step: str) -> list[str]:
    """pyinfra's results row for a step: hosts, success, error, no change."""
    match = re.search(rf"^\s*{re.escape(step)}\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s*$", output, re.M)
    assert match, output
    return list(match.groups())


def with_fleet_data(fleet, data: dict[str, dict]) -> Path:
    """A copy of the fleet file with extra data for some machines (the per-machine layer)."""
    document = yaml.safe_load(fleet.fleet_file.read_text())
    for entry in document["machines"]:
        entry.setdefault("data", {}).update(data.get(entry["name"], {}))
    path = fleet.state / "fleet-sources.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def start(
    fleet, flake: Path, *args: str, fleet_file: Path | None = None, report: Path | None = None
) -> subprocess.Popen:
    """A deploy in its own process group (so a test can kill it with its rsync and ssh)."""
    env = {
        **fleet.env,
        "FLAKEFLEET_FLEET": str(fleet_file or fleet.fleet_file),
        "FLAKEFLEET_REPORT": str(report or os.devnull),
    }
    return subprocess.Popen(
        [str(BIN / "pyinfra"), "-y", "inventory.py", "deploy/site.py", "--data", f"flake={flake}",
         *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip


def deploy(fleet, flake: Path, *args: str, fleet_file: Path | None = None):
    """A deploy run to the end; returns its exit status, its output and the summary."""
    report = fleet.state / "report-sources.json"
    report.unlink(missing_ok=True)
    process = start(fleet, flake, *args, fleet_file=fleet_file, report=report)
    output, _ = process.communicate(timeout=300)
    summary = json.loads(report.read_text()) if report.exists() else {}
    return process.returncode, output, summary


def page_command(fleet, machine: str) -> str:
    """A command fetching the page the machine's web service serves, on the machine."""
    entry = next(m for m in yaml.safe_load(fleet.fleet_file.read_text())["machines"]
                 if m["name"] == machine)  # fmt: skip
    url = f"http://{machine}:{entry['data']['service_port']}/"
    return f"python3 -c 'import urllib.request as u; print(u.urlopen(\"{url}\").read().decode())'"


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> Path:
    """Local files the sources come from (the machines never see the controller's /tmp)."""
    return tmp_path_factory.mktemp("sources")


# ----------------------------------------------------------------------------- the web app


def test_first_deploy_builds_each_machines_web_app_and_serves_it(fleet, flake):
    code, output, report = deploy(fleet, flake, *WEB)
    assert code == 0, output
    for machine in ("web1", "web2"):
        assert report[machine]["status"] == "changed"
        found = read(
            fleet,
            machine,
            dist="cat /var/src/web-app-dist/index.html",
            images="ls /var/src/web-app-dist/images",
            page=page_command(fleet, machine),
        )
        assert f"<title>{machine}</title>" in found["dist"]
        assert found["images"] == "logo.svg"
        assert f"Built for {machine} by flakefleet" in found["page"]  # not the built-in page


# ----------------------------------------------------------------------------- every type


@pytest.fixture(scope="module")
def declared(local: Path) -> dict:
    """One source of each type (and a file tree with a symlink and an excluded file)."""
    tree = local / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "data.txt").write_text("data\n")
    (tree / "debug.log").write_text("excluded\n")
    (tree / "latest").symlink_to("sub/data.txt")
    for index in range(200):
        (tree / "sub" / f"file{index:03}.txt").write_text(f"file {index}\n" * 50)

    library, repository = local / "library", local / "repository"
    for path, text in ((library, "library\n"), (repository, "app v1\n")):
        path.mkdir()
        subprocess.run([*GIT, "init", "-q", "-b", "main"], cwd=path, check=True)
        (path / "README").write_text(text)
        subprocess.run([*GIT, "add", "README"], cwd=path, check=True)
        subprocess.run([*GIT, "commit", "-qm", text], cwd=path, check=True)
    subprocess.run(
        [*GIT, "submodule", "add", "-q", str(library), "lib"], cwd=repository, check=True
    )
    subprocess.run([*GIT, "commit", "-qm", "lib"], cwd=repository, check=True)

    system = f"{platform.machine()}-linux"
    (local / "drv-flake").mkdir()
    (local / "drv-flake" / "flake.nix").write_text(
        "{ outputs = { self }: { packages." + system + ".default = derivation {"
        ' name = "from-flake"; system = "' + system + '"; builder = "/bin/sh";'
        ' args = [ "-c" "echo built by the machine from a flake > $out" ]; }; }; }\n'
    )
    expression = (
        'derivation { name = "hello-src"; system = builtins.currentSystem; builder = "/bin/sh";'
        ' args = [ "-c" "echo hello from $name > $out" ]; }'
    )
    return {
        "tree": {"type": "file", "path": str(tree), "exclude": ["*.log"]},
        "app": {"type": "git", "url": f"file://{repository}", "ref": "main", "submodules": True},
        "flake-link": {"type": "symlink", "target": "config"},
        "machine-info": {"type": "pipe", "command": "echo machine $FLAKEFLEET_MACHINE"},
        "hello": {"type": "derivation", "expression": expression},
        "drv-flake": {"type": "file", "path": str(local / "drv-flake")},
    }


def test_every_type_reaches_every_class_of_machine(fleet, flake, local, declared):
    fleet_file = with_fleet_data(  # web1 alone also realises a flake output, from a source
        fleet, {"web1": {"sources": {"from-flake": {"type": "derivation", "flake": "./drv-flake"}}}}
    )
    code, output, report = deploy(
        fleet, flake, *EVERY_CLASS, *BUILD, *sources_data(declared), fleet_file=fleet_file
    )
    assert code == 0, output
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=local / "repository", capture_output=True, text=True
    ).stdout.strip()
    for machine in ("web1", "web2", "mac1", "home1"):
        assert "sources" in report[machine]["changed"], report[machine]
        r = root(machine)
        found = read(
            fleet,
            machine,
            tree=hash_command(f"{r}/tree"),
            latest=f"readlink {r}/tree/latest",
            log=f"ls {r}/tree/debug.log",
            library=f"cat {r}/app/lib/README",
            link=f"readlink {r}/flake-link",
            hosts=f"cat {r}/flake-link/hosts.json",
            info=f"cat {r}/machine-info",
            hello=f"cat {r}/hello",
            result=f"readlink -f {r}/hello",
            links=f"cd {r} && for f in *; do echo $f $(readlink $f); done",
            from_flake=f"cat {r}/from-flake",
        )
        assert found["tree"] == local_tree_hash(local / "tree", "! -name '*.log'")
        assert found["latest"] == "sub/data.txt"
        assert "No such file" in found["log"]
        assert git_there(fleet, machine, f"{r}/app", "rev-parse", "HEAD") == commit
        assert git_there(fleet, machine, f"{r}/app", "status", "--porcelain") == ""
        assert found["library"] == "library"
        assert found["link"].startswith(".flakefleet/flake-link/")
        assert found["hosts"] == (flake / "hosts.json").read_text().strip()
        assert found["info"] == f"machine {machine}"
        assert found["hello"] == "hello from hello-src"
        assert found["result"].startswith("/nix/store/")
        # Every source, of every type, is a link into the store: the one atomic model.
        links = dict(line.split(" ", 1) for line in found["links"].splitlines())
        for name in declared:
            assert re.fullmatch(rf"\.flakefleet/{name}/[0-9a-f]{{64}}", links[name]), links
        if machine == "web1":
            assert found["from_flake"] == "built by the machine from a flake"
        else:
            assert "No such file" in found["from_flake"]


def test_unchanged_sources_cost_no_ssh_command(fleet, flake, declared):
    fleet_file = fleet.state / "fleet-sources.yaml"
    machines = ("web1", "web2", "mac1", "home1")
    before = {machine: count(fleet, machine, "Accepted publickey") for machine in machines}
    code, output, report = deploy(
        fleet, flake, *EVERY_CLASS, *BUILD, *sources_data(declared), fleet_file=fleet_file
    )
    assert code == 0, output
    # The step yielded nothing on any machine: no rsync, no command.
    assert result_row(output, "Sync the sources to /var/src") == ["4", "-", "-", "4"]
    for machine in machines:
        assert report[machine]["status"] == "unchanged", report[machine]
    for machine in ("web1", "web2"):  # (the closure step reconnects to darwin and home machines)
        connections = count(fleet, machine, "Accepted publickey") - before[machine]
        assert connections == 1  # pyinfra's own; an rsync would be another


def test_one_changed_file_is_the_only_file_written(fleet, flake, local, declared):
    inode = "stat -c %i /var/src/tree/sub/file001.txt /var/src/tree/sub/data.txt"
    before = fleet.ssh("web1", inode).split()
    (local / "tree" / "sub" / "data.txt").write_text("data, changed\n")
    code, output, report = deploy(
        fleet, flake, *WEB, *BUILD, *sources_data(declared),
        fleet_file=fleet.state / "fleet-sources.yaml",
    )  # fmt: skip
    assert code == 0, output
    after = fleet.ssh("web1", inode).split()
    assert after[0] == before[0]  # hard-linked from the previous tree: not sent again
    assert after[1] != before[1]
    assert fleet.ssh("web1", "cat /var/src/tree/sub/data.txt") == "data, changed"
    assert report["web1"]["changed"] == ["sources"]


def test_git_source_cleans_local_changes_on_a_new_commit_or_a_resync(fleet, flake, local, declared):
    app = "/var/src/app"
    fleet.ssh("web1", f"echo local edit >> {app}/README; touch {app}/untracked")
    fleet_file = fleet.state / "fleet-sources.yaml"
    code, output, _ = deploy(
        fleet, flake, *WEB, *BUILD, *sources_data(declared), "--data", "sources_resync=true",
        fleet_file=fleet_file,
    )  # fmt: skip
    assert code == 0, output
    assert git_there(fleet, "web1", app, "status", "--porcelain") == ""
    assert fleet.ssh("web1", f"cat {app}/README") == "app v1"
    (local / "repository" / "README").write_text("app v2\n")
    subprocess.run([*GIT, "commit", "-qam", "v2"], cwd=local / "repository", check=True)
    fleet.ssh("web2", f"echo local edit >> {app}/README; touch {app}/untracked")
    code, output, _ = deploy(
        fleet, flake, *WEB, *BUILD, *sources_data(declared), fleet_file=fleet_file
    )
    assert code == 0, output
    for machine in ("web1", "web2"):
        assert git_there(fleet, machine, app, "status", "--porcelain") == ""
        assert fleet.ssh(machine, f"cat {app}/README") == "app v2"


# ----------------------------------------------------------------------------- layers


def test_groups_and_machines_add_override_and_remove_sources(fleet, flake, local):
    for name in ("shared", "special"):
        (local / name).mkdir()
        (local / name / "which").write_text(f"{name}\n")
    group_data = local / "group_data"
    group_data.mkdir()
    (group_data / "all.py").write_text(
        "sources = " + repr({"notes": {"type": "file", "path": str(local / "shared")}}) + "\n"
    )
    fleet_file = with_fleet_data(
        fleet,
        {
            "web1": {"sources": {"notes": {"path": str(local / "special")},
                                 "extra": {"type": "symlink", "target": "notes"}}},
            "web2": {"sources": {"notes": None}},
        },
    )  # fmt: skip
    code, output, _ = deploy(
        fleet, flake, *EVERY_CLASS, *BUILD, "--group-data", str(group_data), fleet_file=fleet_file
    )
    assert code == 0, output
    assert fleet.ssh("web1", "cat /var/src/notes/which /var/src/extra/which") == "special\nspecial"
    assert fleet.ssh("web2", "ls /var/src/notes", check=False) == ""
    assert fleet.ssh("mac1", "cat /var/src/notes/which") == "shared"
    assert fleet.ssh("home1", f"cat {root('home1')}/notes/which") == "shared"
    # web-app-dist still comes from group_data/web.py, the flake is still config.
    assert fleet.ssh("web1", "ls /var/src") == "config\nextra\nnotes\nweb-app-dist"


def test_undeclared_sources_are_removed_unless_kept(fleet, flake):
    fleet.ssh("web1", "mkdir -p /var/src/mine && echo mine > /var/src/mine/file")  # not ours
    code, output, _ = deploy(fleet, flake, *WEB, *BUILD, "--data", "sources_keep_undeclared=true")
    assert code == 0, output
    assert fleet.ssh("web1", "ls /var/src") == "config\nextra\nmine\nnotes\nweb-app-dist"
    code, output, _ = deploy(fleet, flake, *WEB, *BUILD)
    assert code == 0, output
    assert fleet.ssh("web1", "ls /var/src") == "config\nmine\nweb-app-dist"
    # Their trees stay until the next sync (a rollback of this deploy links them again).
    kept = "config\nextra\nnotes\nweb-app-dist"
    assert fleet.ssh("web1", "ls /var/src/.flakefleet") == kept
    code, output, _ = deploy(fleet, flake, *WEB, *BUILD)
    assert code == 0, output
    assert fleet.ssh("web1", "ls /var/src/.flakefleet") == "config\nweb-app-dist"
    assert fleet.ssh("web1", "cat /var/src/mine/file") == "mine"


# ----------------------------------------------------------------------------- the guard


def test_another_tools_tree_is_left_alone_unless_forced(fleet, flake, local):
    # web1: a source named like an entry flakefleet did not make; web2: krops' tree (its
    # sentinel and a source), no flakefleet marker.
    fleet.ssh(
        "web2", "mv /var/src /var/src.before; mkdir -p /var/src/nixpkgs; touch /var/src/.populate"
    )
    mine = {"mine": {"type": "file", "path": str(local / "shared")}}
    code, output, report = deploy(fleet, flake, *WEB, *BUILD, *sources_data(mine))
    assert code != 0
    assert report["web1"]["error"] == (
        "sources: /var/src/mine exists and was not put there by flakefleet "
        "(--data sources_force=true moves it aside)"
    )
    assert report["web2"]["error"].startswith(
        "sources: /var/src holds files but no flakefleet marker (/var/src/.flakefleet)"
    )
    assert fleet.ssh("web1", "cat /var/src/mine/file") == "mine"
    assert fleet.ssh("web2", "ls -A /var/src") == ".populate\nnixpkgs"
    code, output, report = deploy(
        fleet, flake, *WEB, *BUILD, *sources_data(mine), "--data", "sources_force=true"
    )
    assert code == 0, output
    assert fleet.ssh("web1", "cat /var/src/mine/which") == "shared"
    assert fleet.ssh("web1", "cat /var/src/.flakefleet/.displaced/mine.*/file") == "mine"
    assert fleet.ssh("web2", "ls -A /var/src") == (
        ".flakefleet\n.populate\nconfig\nmine\nnixpkgs\nweb-app-dist"
    )


# ----------------------------------------------------------------------------- atomic swap


def write_tree(path: Path, files: int, size: int, seed: int) -> None:
    generator = random.Random(seed)
    for index in range(files):
        folder = path / f"d{index % 20:02}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{index:04}").write_bytes(generator.randbytes(size))


def test_a_sync_killed_mid_transfer_leaves_every_source_wholly_old_or_wholly_new(
    fleet, flake, local
):
    big, small = local / "big", local / "small"
    write_tree(big, 800, 15_000, seed=1)  # 12 MB
    write_tree(small, 10, 100, seed=2)
    declared = {name: {"type": "file", "path": str(local / name)} for name in ("big", "small")}
    code, output, _ = deploy(fleet, flake, "--limit", "web1", *BUILD, *sources_data(declared))
    assert code == 0, output
    hashes = {name: hash_command(f"/var/src/{name}") for name in ("big", "small", "config")}
    old = read(fleet, "web1", **hashes)

    write_tree(big, 800, 15_000, seed=3)
    write_tree(small, 10, 100, seed=4)
    (flake / "README.sources-test").write_text("changed\n")  # config changes too
    new = {name: local_tree_hash(path) for name, path in (("big", big), ("small", small),
                                                           ("config", flake))}  # fmt: skip
    process = start(
        fleet, flake, "--limit", "web1", *BUILD, *sources_data(declared),
        "--data", 'sources_rsync_options=["--bwlimit=2000"]',
    )  # fmt: skip
    try:
        partial = "ls /var/src/.flakefleet/big/*.partial/d*/ 2>/dev/null | grep -c '^f'"
        deadline = time.monotonic() + 60
        while int(fleet.ssh("web1", partial, check=False) or 0) < 100:
            assert time.monotonic() < deadline and process.poll() is None, "no transfer seen"
            time.sleep(0.1)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
    now = read(fleet, "web1", sent=partial, **hashes)
    assert 100 <= int(now.pop("sent")) < 800  # killed mid-transfer
    for name, value in now.items():
        assert value in (old[name], new[name]), name
    assert now["big"] == old["big"]

    code, output, _ = deploy(fleet, flake, "--limit", "web1", *BUILD, *sources_data(declared))
    assert code == 0, output
    partial = "ls /var/src/.flakefleet/big | grep -c partial || true"
    now = read(
        fleet, "web1", trees="ls /var/src/.flakefleet/big | wc -l", partial=partial, **hashes
    )
    # All new, no partial tree left; the tree it replaced is kept (for a rollback) and no other.
    assert now == {**new, "trees": "2", "partial": "0"}


def tree_files(path: Path) -> dict[str, str]:
    """Each file under a local tree, by relative path: its SHA-256."""
    return {
        f"./{file.relative_to(path)}": hashlib.sha256(file.read_bytes()).hexdigest()
        for file in path.rglob("*")
        if file.is_file()
    }


def test_a_reader_of_the_live_tree_never_sees_the_next_one_written_into_it(fleet, flake, local):
    """The new tree is prepared beside the live one and swapped in: a process that entered the
    live tree before the sync (a service reading its files) sees its old files or none,
    never new files written into the tree it is in."""
    tree = local / "swap"
    write_tree(tree, 40, 200, seed=5)
    declared = {"swap": {"type": "file", "path": str(tree)}}
    code, output, _ = deploy(fleet, flake, "--limit", "web1", *BUILD, *sources_data(declared))
    assert code == 0, output
    old = tree_files(tree)
    reader = fleet.ssh(
        "web1", "cd /var/src/swap/ && { nohup sleep 600 >/dev/null 2>&1 </dev/null & echo $!; }"
    )
    try:
        write_tree(tree, 40, 200, seed=6)
        new = tree_files(tree)
        code, output, _ = deploy(fleet, flake, "--limit", "web1", *BUILD, *sources_data(declared))
        assert code == 0, output
        listing = "find . -type f -print0 | sort -z | xargs -0 -r sha256sum"
        seen = fleet.ssh("web1", f"cd /proc/{reader}/cwd && {listing}")
        live = fleet.ssh("web1", f"cd /var/src/swap/ && {listing}")
    finally:
        fleet.ssh("web1", f"kill {reader}", check=False)
    assert {name: digest for digest, name in map(str.split, live.splitlines())} == new
    seen_files = {name: digest for digest, name in map(str.split, seen.splitlines())}
    assert {name: digest for name, digest in seen_files.items() if old.get(name) != digest} == {}


# ----------------------------------------------------------------------------- builds


def build_source(log: Path) -> dict:
    """A build per machine that logs its start and end, from a per-machine input.

    Each build waits (up to 60 s, then fails) until two builds have started: builds run one
    after another would fail, builds run side by side pass however loaded the machine is.
    """
    started = log.parent / "builds-started"
    command = (
        f'echo "$FLAKEFLEET_MACHINE start $(date +%s.%N)" >> {log}; '
        f"mkdir -p {started}; touch {started}/$FLAKEFLEET_MACHINE; i=0; "
        f'while [ "$(ls {started} | wc -l)" -lt 2 ]; do '
        '[ $i -lt 600 ] || { echo "no other build started" >&2; exit 9; }; '
        "i=$((i + 1)); sleep 0.1; done; . ./settings; "
        'mkdir dist; echo "$GREETING" > dist/greeting; '
        f'echo "$FLAKEFLEET_MACHINE end $(date +%s.%N)" >> {log}'
    )
    inputs = {"settings": str(log.parent / "settings" / "{machine}")}
    return {"type": "file", "build": {"inputs": inputs, "command": command, "output": "dist"}}


def build_runs(log: Path) -> dict[str, list[tuple[float, float]]]:
    starts: dict[str, float] = {}
    runs: dict[str, list[tuple[float, float]]] = {}
    for line in log.read_text().splitlines() if log.exists() else []:
        machine, what, when = line.split()
        if what == "start":
            starts[machine] = float(when)
        else:
            runs.setdefault(machine, []).append((starts[machine], float(when)))
    return runs


def test_builds_run_in_parallel_once_per_change_for_selected_machines(fleet, flake, local):
    log = local / "builds.log"
    (local / "settings").mkdir()
    for machine in ("web1", "web2", "db1"):
        (local / "settings" / machine).write_text(f"GREETING='hello {machine}'\n")
    declared = {"greeting": build_source(log)}
    code, output, _ = deploy(fleet, flake, *WEB, *BUILD, *sources_data(declared))
    assert code == 0, output
    runs = build_runs(log)
    assert sorted(runs) == ["web1", "web2"]  # db1 was not selected
    (web1_start, web1_end), (web2_start, web2_end) = runs["web1"][0], runs["web2"][0]
    assert web1_start < web2_end and web2_start < web1_end  # they overlapped
    assert fleet.ssh("web2", "cat /var/src/greeting/greeting") == "hello web2"

    code, output, _ = deploy(fleet, flake, *WEB, *BUILD, *sources_data(declared))
    assert code == 0, output
    assert {m: len(r) for m, r in build_runs(log).items()} == {"web1": 1, "web2": 1}

    (local / "settings" / "web1").write_text("GREETING='hello again'\n")
    code, output, _ = deploy(fleet, flake, *WEB, *BUILD, *sources_data(declared))
    assert code == 0, output
    assert {m: len(r) for m, r in build_runs(log).items()} == {"web1": 2, "web2": 1}
    assert fleet.ssh("web1", "cat /var/src/greeting/greeting") == "hello again"


def test_a_failed_build_stops_only_its_machine_and_syncs_nothing_of_it(fleet, flake, local):
    log = local / "builds.log"
    (local / "settings" / "web2").write_text("echo 'cannot compile web2' >&2; exit 7\n")
    (flake / "README.sources-test").write_text("changed again\n")
    before = fleet.ssh("web2", "readlink /var/src/config /var/src/greeting")
    code, output, report = deploy(
        fleet, flake, *WEB, *BUILD, *sources_data({"greeting": build_source(log)})
    )
    assert code != 0
    error = report["web2"]["error"]
    assert error.startswith("sources: greeting: build failed (exited 7): ")
    assert "cannot compile web2" in error and "cannot compile web2" in output
    assert fleet.ssh("web2", "readlink /var/src/config /var/src/greeting") == before
    assert report["web1"]["status"] == "changed"
    assert fleet.ssh("web1", "cat /var/src/config/README.sources-test") == "changed again"


# ----------------------------------------------------------------------------- bad input


# One bad input per machine: each machine's line names it, the source and where it was declared.
BAD = {
    "web1": (
        {"gone": {"type": "file", "path": "/nonexistent/dir"}},
        "source 'gone' (FLEET, machine 'web1', field 'path'): '/nonexistent/dir' does not exist "
        "(/nonexistent/dir)",
    ),
    "web2": (
        {"x": {"type": "tarball", "path": "."}},
        "source 'x' (FLEET, machine 'web2', field 'type'): unknown type 'tarball' "
        "(expected one of: file, git, symlink, pipe, derivation)",
    ),
    "db1": (
        {"repo": {"type": "git", "url": "file:///nonexistent/repo.git", "ref": "main"}},
        "source 'repo' (FLEET, machine 'db1', field 'url'): cannot fetch "
        "file:///nonexistent/repo.git: fatal: '/nonexistent/repo.git' does not appear to be a "
        "git repository",
    ),
    "vpn1": (
        {"repo": {"type": "git", "url": "REPOSITORY", "ref": "no-such-branch"}},
        "source 'repo' (FLEET, machine 'vpn1', field 'ref'): ref 'no-such-branch' does not "
        "exist in REPOSITORY",
    ),
    "build1": (
        {"etc/passwd": {"type": "symlink", "target": "config"}},
        "source 'etc/passwd' (FLEET, machine 'build1'): 'etc/passwd' is not a plain file name "
        "(letters, digits, '.', '_', '+', '-'; not starting with '.'; no '..')",
    ),
    "mac1": (
        {"..": {"type": "symlink", "target": "config"}},
        "source '..' (FLEET, machine 'mac1'): '..' is not a plain file name "
        "(letters, digits, '.', '_', '+', '-'; not starting with '.'; no '..')",
    ),
}


def mark_machines(fleet, machines) -> None:
    for machine in machines:
        fleet.ssh(machine, "touch /tmp/before-bad-input")


def copied_since_mark(fleet, machine: str) -> str:
    return fleet.ssh(machine, "find /var/src -newer /tmp/before-bad-input 2>/dev/null", check=False)


def test_every_bad_input_stops_the_run_before_anything_is_copied(fleet, flake, local):
    cases = json.loads(json.dumps(BAD).replace("REPOSITORY", str(local / "repository")))
    fleet_file = with_fleet_data(
        fleet, {m: {"sources": sources} for m, (sources, _) in cases.items()}
    )
    (flake / "README.sources-test").write_text("a change that must not be copied\n")
    mark_machines(fleet, fleet.machines)
    code, output, _ = deploy(fleet, flake, *BUILD, fleet_file=fleet_file)
    assert code == 1
    errors = sorted(line for line in output.splitlines() if line.startswith("flakefleet:"))
    expected = sorted(
        f"flakefleet: {machine}: {line.replace('FLEET', str(fleet_file))}"
        for machine, (_, line) in cases.items()
    )
    assert errors == expected, output
    assert "operations/sources.py" not in output  # no traceback through the sources step
    for machine in fleet.machines:  # home1 has no bad source, but the run stopped for it too
        assert copied_since_mark(fleet, machine) == ""


def test_a_bad_source_of_many_machines_is_one_line(fleet, flake):
    (flake / "README.sources-test").write_text("another change that must not be copied\n")
    mark_machines(fleet, ("web1", "web2"))
    code, output, _ = deploy(fleet, flake, *WEB, *BUILD, *sources_data({"x": {"type": "nope"}}))
    assert code == 1
    errors = [line for line in output.splitlines() if line.startswith("flakefleet:")]
    assert errors == [
        "flakefleet: web1, web2: source 'x' (--data, field 'type'): unknown type 'nope' "
        "(expected one of: file, git, symlink, pipe, derivation)"
    ], output
    assert copied_since_mark(fleet, "web1") == copied_since_mark(fleet, "web2") == ""
