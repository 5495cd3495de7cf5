"""The walking skeleton end to end: deploy the example flake to the test fleet, redeploy with
no change, change one machine, and lose one machine, with real Nix, sshd, rsync and pyinfra.

The tests run in order on one fleet: each starts from the state the previous one left.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from xml.etree import ElementTree

from conftest import BIN, ROOT, evaluate, profile_of, set_host, sources_of

from flakefleet.fleet import fleet_state_name
from flakefleet.prefetch import Prefetch, records
from flakefleet.process import run_fed

# Programs every NixOS system has (environment.corePackages: coreutils-full, curl, findutils,
# gnugrep, gnused, ...; iproute2 from networking; systemd; Nix), and the shell's builtins: what
# a smoke check may ask a machine for. Not python3 or perl: a minimal NixOS has neither.
NIXOS_PROGRAMS = (
    {"cat", "cut", "date", "echo", "id", "mktemp", "readlink", "rm", "sleep", "sort", "tail"}
    | {"test", "true", "uname", "wc", "curl", "find", "grep", "sed", "ss", "systemctl"}
    | {"nix-env", "nix-store", "[", "cd", "command", "exit", "printf"}
)
# A program a command runs: a word at the start of a line or after | ; & ( $( { (not ${ or
# %{, nor the 1 of 2>&1), and not a variable's assignment.
PROGRAM = re.compile(r"(?:^|[|;(]|(?<!>)&|\$\(|(?<![$%]){)\s*(?![\w.-]*=)([\w./\[-]+)", re.M)


def remote_state(fleet, machine: str) -> dict[str, str]:
    """What a deploy may change on a machine, read directly with ssh."""
    profile, running = profile_of(fleet, machine)
    script = (
        f"readlink -f {running}; readlink -f {profile}; "
        f"nix-env -p {profile} --list-generations | wc -l; "
        "cat /var/log/activations.log 2>/dev/null | wc -l; "
        f"readlink {sources_of(fleet, machine)}/config || echo none"
    )
    current, profile, generations, activations, sources = fleet.ssh(machine, script).splitlines()
    return {
        "current": current,
        "profile": profile,
        "generations": generations,
        "activations": activations,
        "sources": sources,
    }


def test_first_deploy_converges_every_machine(fleet, flake):
    shutil.rmtree(ROOT / records(fleet.fleet_file), ignore_errors=True)  # none recorded yet
    before = {machine: fleet.sessions(machine) for machine in fleet.machines}
    result = fleet.deploy(flake)
    assert result.returncode == 0, result.output
    # One machine of each kin (class and roles) was checked first, command by command; the
    # other web machine then batched what those checks asked (less what names that machine).
    spent = sorted(fleet.sessions(web) - before[web] for web in ("web1", "web2"))
    assert spent[0] + 5 < spent[1], spent
    for machine in fleet.machines:
        expected = evaluate(flake, machine)
        state = remote_state(fleet, machine)
        assert state["current"] == expected
        assert state["profile"] == expected
        assert state["generations"] == "1"
        assert result.status(machine) == "changed"
        assert result.report[machine]["system"] == expected
        hosts = fleet.ssh(machine, f"cat {sources_of(fleet, machine)}/config/hosts.json")
        assert hosts == (flake / "hosts.json").read_text().strip()
        # The checks ran and passed for every machine.
        assert any(
            "smoke checks:" in note and "passed" in note for note in result.report[machine]["notes"]
        )


def test_second_deploy_changes_nothing(fleet, flake):
    before = {machine: remote_state(fleet, machine) for machine in fleet.machines}
    logins = {machine: fleet.logins(machine) for machine in fleet.machines}
    result = fleet.deploy(flake)
    assert result.returncode == 0, result.output
    # One login a machine, pyinfra's: the smoke checks' batch went over it too.
    assert {m: fleet.logins(m) - logins[m] for m in fleet.machines} == dict.fromkeys(
        fleet.machines, 1
    )
    # Nothing in the flake changed: no machine is evaluated again.
    assert f"evaluated 0 of {len(fleet.machines)} machines" in result.output, result.output
    for machine in fleet.machines:
        assert result.status(machine) == "unchanged", result.report[machine]
        assert remote_state(fleet, machine) == before[machine]
        # The preflight alone: with nothing to do, no lock is taken, so none is released.
        assert result.report[machine]["commands"] == 1, result.report[machine]
        assert result.report[machine]["check_commands"] == 1, result.report[machine]


def test_check_unchanged_false_checks_only_the_machines_a_run_changed_and_says_so(fleet, flake):
    fleet.ssh("web1", f"rm {sources_of(fleet, 'web1')}/config")  # web1 alone has work
    result = fleet.deploy(flake, "--data", "check_unchanged=False")
    assert result.returncode == 0, result.output
    assert result.report["web1"]["changed"] == ["sources"]
    assert any(note.startswith("smoke checks:") for note in result.report["web1"]["notes"])
    assert result.report["web1"]["check_commands"] == 0  # changed: checked over a new login
    for machine in set(fleet.machines) - {"web1"}:
        report = result.report[machine]
        assert report["status"] == "unchanged" and report["check_commands"] == 0, report
        assert (
            "health checks: not run, this run changed nothing (check_unchanged = False)"
            in report["notes"]
        )
    assert "not run, this run changed nothing" in result.output  # the summary says so


def test_smoke_checks_ask_only_for_programs_a_nixos_machine_has(fleet):
    """The first deploy recorded every command the checks asked (tests/smoke/ runs unchanged
    on a real NixOS machine, whose PATH has no /usr/bin: the test machines' has)."""
    asked: dict[str, set[str]] = {}
    for record in (ROOT / records(fleet.fleet_file)).glob("*.json"):
        for command in json.loads(record.read_text()):
            for program in PROGRAM.findall(command):
                asked.setdefault(program.rsplit("/", 1)[-1], set()).add(record.stem)
    assert "readlink" in asked and "curl" in asked  # the pattern finds programs
    assert {p: m for p, m in asked.items() if p not in NIXOS_PROGRAMS} == {}


def test_smoke_checks_cost_one_round_trip_a_machine_once_recorded(fleet, tmp_path):
    """The commands each machine's checks asked are recorded; the next run sends them in one
    batch per machine, with the same verdicts. Each answer is this run's own: web2's service
    stopped between runs fails its checks."""

    def checks() -> tuple[int, dict[str, int], dict[str, str]]:
        before = {machine: fleet.sessions(machine) for machine in fleet.machines}
        junit = tmp_path / "junit.xml"
        done = subprocess.run(
            [str(BIN / "pytest"), "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "smoke"),
             "--fleet", str(fleet.fleet_file), f"--junitxml={junit}"],
            cwd=tmp_path, env=fleet.env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        spent = {machine: fleet.sessions(machine) - before[machine] for machine in fleet.machines}
        verdicts = {
            case.get("name", ""): next(
                (child.tag for child in case if child.tag in ("failure", "error", "skipped")),
                "passed",
            )
            for case in ElementTree.parse(junit).iter("testcase")
        }
        return done.returncode, spent, verdicts

    status, alone, verdicts = checks()
    assert status == 0 and all(count > 2 for count in alone.values()), alone
    records = tmp_path / ".flakefleet" / "checks" / fleet_state_name(fleet.fleet_file)
    assert (records / "web1.json").exists()
    status, batched, again = checks()
    assert status == 0 and batched == dict.fromkeys(fleet.machines, 1), batched
    assert again == verdicts
    fleet.ssh("web2", "systemctl stop fleet-web.service")
    try:
        status, batched, stopped = checks()
    finally:
        fleet.ssh("web2", "systemctl start fleet-web.service")
    assert status != 0
    changed = sorted(name for name, verdict in stopped.items() if verdict != verdicts[name])
    assert changed == ["test_page_is_this_machines[web2]", "test_service_answers[web2]"], stopped
    assert {stopped[name] for name in changed} == {"failure"}


def test_checks_take_the_batches_sent_for_them_and_log_in_only_without(fleet, tmp_path):
    """What a deploy does at its health gate: each machine's batch sent over its own connection
    (here, ssh) and handed to pytest through a pipe. A batch that did not come (garbage in the
    pipe: a deploy cut short) is sent by the checks themselves."""
    batch = Prefetch(Prefetch.recorded(ROOT / records(fleet.fleet_file), "web1"))
    script = batch.script(armored=True)
    assert script is not None
    sent = {"web1": {"commands": batch.expected, "output": fleet.ssh("web1", script)}}

    def checks(fed: bytes) -> tuple[int, int]:
        before = fleet.logins("web1")
        done = run_fed(
            lambda fd: [str(BIN / "pytest"), "-q", "-p", "no:cacheprovider",
                        str(ROOT / "tests" / "smoke"), "--fleet", str(fleet.fleet_file),
                        "--machine=web1", f"--batches-fd={fd}"],
            lambda: fed, cwd=str(ROOT), timeout=300,
        )  # fmt: skip
        return done.returncode, fleet.logins("web1") - before

    assert checks(json.dumps(sent).encode()) == (0, 0)
    assert checks(b'{"web1": {"comm') == (0, 1)


def test_changing_one_machine_redeploys_only_that_machine(fleet, flake):
    before = {machine: remote_state(fleet, machine) for machine in fleet.machines}
    set_host(flake, "web2", version="2")
    result = fleet.deploy(flake)
    assert result.returncode == 0, result.output
    after = remote_state(fleet, "web2")
    assert after["current"] == evaluate(flake, "web2") != before["web2"]["current"]
    assert after["generations"] == "2"
    assert "switch" in result.report["web2"]["changed"]
    for machine in fleet.machines:
        if machine == "web2":
            continue
        # The flake tree changed for everyone (sources), but no other system did.
        assert result.report[machine]["changed"] == ["sources"]
        state = remote_state(fleet, machine)
        assert state["current"] == before[machine]["current"]
        assert state["activations"] == before[machine]["activations"]


def test_plan_shows_changes_and_drift_and_changes_nothing(fleet, flake):
    """deploy/plan.py: web1's new version with its package changes, db1 set by hand to a
    system no generation holds; one round trip per machine, no lock, nothing changed."""
    set_host(flake, "web1", version="3")
    hand = fleet.ssh("db1", "readlink -f /run/current-system/sw")  # any store path will do
    fleet.ssh("db1", f"ln -sfn {hand} /run/current-system")
    before = {machine: remote_state(fleet, machine) for machine in fleet.machines}
    sessions = {machine: fleet.sessions(machine) for machine in fleet.machines}

    result = fleet.deploy(flake, deploy_file="deploy/plan.py")

    assert result.returncode == 0, result.output
    for machine in fleet.machines:  # the state read, then remote_state: a session each
        assert remote_state(fleet, machine) == before[machine], machine
        assert fleet.sessions(machine) - sessions[machine] == 2, machine
    section = result.output.split("--> flakefleet plan\n", 1)[1].split("\n\n", 1)[0]
    plan = [line.removeprefix("    ") for line in section.splitlines()]
    headings = [re.match(VERDICT, line) for line in plan if not line.startswith("      ")]
    assert [heading[1] for heading in headings if heading] == sorted(fleet.machines), plan
    verdicts = {heading[1]: heading[2] for heading in headings if heading}
    assert verdicts == {
        machine: "would switch" if machine in ("web1", "db1") else "up to date"
        for machine in fleet.machines
    }
    lines = [line.strip() for line in plan]
    new, old = name(evaluate(flake, "web1")), name(before["web1"]["current"])
    assert f"web1      would switch  {old} → {new}" in lines
    assert "nixos-system-web1: 1 → 3" in lines, "\n".join(plan)  # diff-closures' package line
    assert f"drift: runs {name(hand)}, which no generation holds: set by hand?" in lines
    # The flake (source `config`) changed in one file, for every machine; web1's closure.
    assert lines.count("sources: config: 1 changed (hosts.json)") == len(fleet.machines), plan
    assert any(re.fullmatch(r"closure: [\d.]+ \S+ → [\d.]+ \S+ \([+-][\d.]+ \S+\)", line)
               for line in lines), plan  # fmt: skip
    assert "--> flakefleet summary" not in result.output  # nothing failed, nothing changed
    for machine in fleet.machines:
        assert fleet.ssh(machine, "ls -d /run/flakefleet/lock 2>/dev/null || true") == ""


VERDICT = r"(\S+)\s+(up to date|would switch|would select)"


def name(path: str) -> str:
    """A store path's name without its hash, as the plan shows it."""
    return path.rsplit("/", 1)[-1].split("-", 1)[-1]
