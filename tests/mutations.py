"""Plant deliberate bugs one at a time in a scratch copy of the work tree and report whether
the tests catch each one.

    .venv/bin/python tests/mutations.py [--rev REV] [--only NAME ...] [--full] [--baseline]

Each mutation replaces one exact piece of text in one file of a copy of REV (default HEAD;
`git archive`, so the real tree is never touched) and runs the tests it names (or the whole
suite with --full) there. A mutation whose text is not found is reported "could not plant":
the code moved, and the mutation must be pointed at its new place. "caught" means pytest
reported failing tests; "survived" means every selected test passed with the bug in place.
--baseline first runs each selection unmutated: a selection that fails without a bug
catches nothing.

The scratch copies run their test fleets on their own ports (FLAKEFLEET_TEST_PORT), so a
developer's test run may go on beside them.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = ROOT / ".venv" / "bin" / "python"
LOGS = Path(tempfile.gettempdir()) / "flakefleet-mutations"  # each run's pytest output
PORT = os.environ.get("FLAKEFLEET_MUTATION_PORT", "24700")

ACTIVATION = "tests/integration/test_activation.py"
FAULTS = "tests/integration/test_faults.py"
SOURCES = "tests/integration/test_sources.py"
VERDICTS = "tests/integration/test_verdicts.py"
INTERRUPTS = "tests/integration/test_interrupts.py"
DEPLOY = "tests/integration/test_deploy.py"
SYSTEMD = "tests/integration/test_systemd_machines.py"
UPSTREAM = "tests/integration/test_upstream.py"
HOME = "tests/integration/test_home_manager.py"
DARWIN = "tests/integration/test_darwin_activation.py"
WINDOWS = "tests/integration/test_confirmation_windows.py"
KEYS = "tests/integration/test_keys.py"
RECIPIENTS = "tests/integration/test_recipients.py"
VARS = "tests/integration/test_vars.py"


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]  # pytest arguments: files, file::test, or -k expressions


MUTATIONS = [
    Mutation(
        "reboot: boot id not compared",
        "operations/reboot.py",
        "if len(lines) == 2 and lines[0] != boot_id:",
        "if len(lines) == 2:",
        (ACTIVATION, "-k", "reboot"),
    ),
    Mutation(
        "reboot: expected system not checked",
        "operations/reboot.py",
        "if lines[1] != system:",
        "if False:",
        (ACTIVATION, "-k", "reboot"),
    ),
    Mutation(
        "confirmation over pyinfra's connection",
        "operations/activation.py",
        "target.run(activation.confirm_command(), timeout=30)",
        # pyinfra's session, as root the way the deploy's own steps become root
        "target.run_over(run.state.inventory.get_host(name), activation.confirm_command())",
        (ACTIVATION, "-k", "sshd or confirmation"),
    ),
    Mutation(
        "smoke-check errors count as passes",
        "operations/verify.py",
        'if case.find("failure") is not None or case.find("error") is not None:',
        'if case.find("failure") is not None:',
        (VERDICTS, FAULTS, "-k", "smoke or check"),
    ),
    Mutation(
        "sources updated in place, not swapped",
        "operations/sources.py",
        'return [f"rm -rf {path}", f"mv {path}.partial {path}", '
        'f"live {name} {shlex.quote(tree)}"]',
        # Sync the prepared tree into the live one (rsync: changed contents only, unchanged inodes
        # kept), then rename the live directory to the new tree's name.
        'return [f\'cur=$(readlink "$r"/{name} || true); if [ -d {path}.partial ] && '
        '[ -n "$cur" ] && [ -d "$r/$cur" ]; then '
        'rsync -a --delete --checksum {path}.partial/ "$r/$cur"/ && '
        'rm -rf {path}.partial && mv "$r/$cur" {path}; else rm -rf {path}; '
        'mv {path}.partial {path}; fi\', f"live {name} {shlex.quote(tree)}"]',
        (SOURCES,),
    ),
    # More of the README's promises.
    Mutation(
        "smoke checks: a machine without results passes",
        "operations/verify.py",
        "verdict.failures.append(NO_RESULT)",
        "pass",
        (VERDICTS,),
    ),
    Mutation(
        "smoke checks: an undeclared skip passes",
        "operations/verify.py",
        'if _property(case, "skips") == "acceptable":',
        "if True:",
        (VERDICTS,),
    ),
    Mutation(
        "break_lock breaks any holder's lock",
        "operations/preflight.py",
        "broken = holder is not None and run.settings(host.name).break_lock == holder.name",
        "broken = holder is not None and bool(run.settings(host.name).break_lock)",
        (ACTIVATION, "-k", "lock"),
    ),
    Mutation(
        "a failed activation is not rolled back",
        "operations/scripts/activate.sh",
        '[ $status -eq 0 ] || roll_back "activation failed (exit $status)"',
        '[ $status -eq 0 ] || { phase failed "activation failed (exit $status)"; exit 1; }',
        (FAULTS, "-k", "activation"),
    ),
    Mutation(
        "a misspelt setting is ignored",
        "flakefleet/settings.py",
        "near = difflib.get_close_matches(name, known, n=1, cutoff=0.85)",
        "near: list[str] = []",
        ("tests/unit/test_settings.py", FAULTS, "-k", "setting"),
    ),
    Mutation(
        "a switch sets the boot default before its confirmation",
        "operations/scripts/activate.sh",
        "  deferred=1\n",
        "  deferred=\n",
        (INTERRUPTS, "-k", "power_cut"),
    ),
    Mutation(
        "the worker's unit gets only systemd's PATH",
        "flakefleet/worker.py",
        ' --setenv=PATH="$PATH" -- ',
        " -- ",
        (SYSTEMD,),
    ),
    # The test fleet as strict as the field (#17): each imitation fix, undone.
    Mutation(
        "the imitation starts services as processes under systemd too",
        "example/lib/switch-to-configuration.sh",
        "if [ ! -d /run/systemd/system ]; then",
        "if true; then",
        (SYSTEMD, "-k", "runs_as_a_unit or role_services or units_start"),
    ),
    Mutation(
        "the imitation's switch relies on its caller's PATH",
        "example/lib/switch-to-configuration.sh",
        "export PATH=/usr/bin:/usr/sbin\nsystem=@out@",
        "system=@out@",
        (SYSTEMD, "-k", "runs_as_a_unit or nixos_rebuild"),
    ),
    Mutation(
        "no smoke check for failed units",
        "tests/smoke/test_units.py",
        'assert failed == "", f"failed units:\\n{failed}"',
        "assert failed or True",
        (SYSTEMD, "-k", "runs_as_a_unit or fails_shows"),
    ),
    Mutation(
        "the plan never asks dry-activate",
        "operations/plan.py",
        "            new = run.builds.system(host.name).out",
        '            new = ""',
        (SYSTEMD, "-k", "runs_as_a_unit or plan_tells"),
    ),
    Mutation(
        "the plan runs key commands",
        "flakefleet/keys.py",
        "        if not self.planning:\n            return None\n",
        "        return None\n",
        (KEYS, "-k", "baseline or arrive or plan_names"),
    ),
    Mutation(
        "a systemd machine's journal stays off its console",
        "testbed/template.py",
        "ForwardToConsole=yes",
        "ForwardToConsole=no",
        ("tests/testbed/test_testbed_systemd.py", "-k", "sessions"),
    ),
    Mutation(
        "a home machine's user has no systemd manager of its own",
        "testbed/files.py",
        'put(f"/var/lib/systemd/linger/{machine.user}", "")',
        "pass",
        ("tests/testbed/test_testbed_systemd.py", "-k", "home"),
    ),
    Mutation(
        "a rollback leaves the new sources in place",
        "operations/scripts/activate.sh",
        "  elif restore_sources && activate",
        "  elif activate",
        (INTERRUPTS, "-k", "sources_back"),
    ),
    Mutation(
        "the worker is detached with setsid, which a Mac lacks",
        "flakefleet/worker.py",
        '"detach() { if command -v setsid >/dev/null; then "',
        '"detach() { if true; then "',
        (DEPLOY, "-k", "first_deploy"),
    ),
    Mutation(
        "unchanged sources still run the install command",
        "operations/sources.py",
        "    if not changes:\n        host.noop(",
        "    if False:\n        host.noop(",
        (SOURCES, "-k", "every_type or unchanged"),
    ),
    Mutation(
        "a rollback to a generation leaves today's sources",
        "operations/scripts/activate.sh",
        "\nsources_of_generation\n",
        "\n: sources_of_generation\n",
        (INTERRUPTS, "-k", "older_generation"),
    ),
    Mutation(
        "the sync drops the trees older generations run with",
        "operations/scripts/install-sources.sh",
        'grep -qxF -- "$base" || rm -rf "$tree"',
        'rm -rf "$tree"',
        (INTERRUPTS, "-k", "older_generation"),
    ),
    Mutation(
        "another machine id behind a known host key is deployed",
        "facts/machine.py",
        'if [ -n {expected} ] && [ "$i" != {expected} ]; then',
        "if false; then",
        (INTERRUPTS, "-k", "known_host_key"),
    ),
    Mutation(
        "home-manager's activation is called without --driver-version",
        "operations/scripts/activate.sh",
        '    home) "$1/activate" --driver-version 1 ;;',
        '    home) "$1/activate" ;;',
        (HOME, "-k", "fresh_user"),
    ),
    Mutation(
        "an old per-user home-manager profile is not moved with its generations",
        "operations/scripts/activate.sh",
        'if [ "$class" = home ] && ! migrate_home_profile; then',
        "if false; then",
        (HOME, "-k", "fresh_user or old_nix"),
    ),
    Mutation(
        "darwin dry-activate activates",
        "operations/scripts/activate.sh",
        '  [ "$2" = dry-activate ] && check=1\n',
        "",
        (DARWIN, "-k", "changes_nothing"),
    ),
    Mutation(
        "the worker ignores a hold",
        "operations/scripts/activate.sh",
        'if [ -e "$dir/hold" ]; then rm -f "$dir/hold"; ticks=0; fi',
        ":",
        (WINDOWS, "-k", "fast_machine"),
    ),
    Mutation(
        "keys: content on the upload's command line",
        "operations/keys.py",
        "script, content = keys.upload_script(changes), keys.upload_input(changes)",
        "content = keys.upload_input(changes)\n"
        "    script = \"k='\" + content.replace('\\n', ' ') + \"'; \"\n"
        "    script += keys.upload_script(changes)",
        (KEYS,),
    ),
    Mutation(
        "keys: digest not compared (every deploy uploads)",
        "flakefleet/keys.py",
        "and there.digest == key.digest",
        "and there.digest == key.digest + 'x'",
        (KEYS,),
    ),
    Mutation(
        "keys: a missing file not noticed (reboot)",
        "flakefleet/keys.py",
        "== (key.permissions, key.owner, key.group)",
        "!= (None,)",
        (KEYS,),
    ),
    Mutation(
        "keys: undeclared keys stay",
        "flakefleet/keys.py",
        "if name not in declared",
        "if False",
        (KEYS,),
    ),
    Mutation(
        "keys: a missing owner skipped (colmena's uploader)",
        "flakefleet/keys.py",
        '{files} 2>/dev/null || "',
        '{files} 2>/dev/null; true || "',
        (KEYS,),
    ),
    Mutation(
        "keys: age's failure ignored",
        "flakefleet/keys.py",
        "    if completed.returncode != 0:\n        reason = completed.stderr",
        "    if False:\n        reason = completed.stderr",
        (KEYS,),
    ),
    Mutation(
        "keys: not uploaded again after the deploy's reboot",
        "operations/keys.py",
        'if "rebooted" not in Run.of(state).outcome(host.name).changed:',
        "if True:",
        (KEYS,),
    ),
    Mutation(
        "recipients: a changed host key not refused",
        "operations/recipients.py",
        "if listed and known and known.split()[:2] != listed.split()[:2]:",
        "if False:",
        (RECIPIENTS,),
    ),
    Mutation(
        "recipients: every file re-encrypted (agenix -r)",
        "flakefleet/recipients.py",
        "        if not right:\n            try:",
        "        if True:\n            try:",
        (RECIPIENTS,),
    ),
    Mutation(
        "recipients: host keys not read again",
        "operations/recipients.py",
        'if found.machines.get(each.name, "").split()[:2] != key.split()[:2]:',
        "if each.name not in found.machines:",
        (RECIPIENTS,),
    ),
    Mutation(
        "vars: what depends on a regenerated generator stays",
        "flakefleet/vars.py",
        "stale = any(dependency in ran for dependency in generator.dependencies)",
        "stale = False",
        (VARS,),
    ),
    Mutation(
        "vars: generators run at every deploy",
        "flakefleet/vars.py",
        "if store.complete(machine, generator) and name not in regenerate and not stale:",
        "if False:",
        (VARS,),
    ),
    Mutation(
        "vars: a shared generator encrypted to its first machine only",
        "operations/keys.py",
        "        if generator.share\n",
        "        if False\n",
        (VARS,),
    ),
    Mutation(
        "recipients: generated vars not re-encrypted",
        "operations/recipients.py",
        "    files.update(_generated(run, settings, found))\n",
        "",
        (VARS,),
    ),
]


@dataclass
class Outcome:
    verdict: str
    detail: str
    seconds: float


def scratch_copy(rev: str) -> Path:
    """A copy of `rev`'s files, with the real tree's virtualenv linked in."""
    directory = Path(tempfile.mkdtemp(prefix="flakefleet-mutant-"))
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive, check=True)
    (directory / ".venv").symlink_to(ROOT / ".venv")
    return directory


def run_tests(copy: Path, tests: tuple[str, ...]) -> tuple[int, str]:
    env = {
        **os.environ,
        # The copy's modules, not the editable install's (which points at the real tree).
        "PYTHONPATH": str(copy),
        "FLAKEFLEET_TEST_PORT": PORT,
        "FLAKEFLEET_TESTBED_TEST_PORT": str(int(PORT) - 100),
    }
    env.pop("FLAKEFLEET_TEST_STATE", None)
    completed = subprocess.run(
        [str(PYTHON), "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
        cwd=copy, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    return completed.returncode, completed.stdout + completed.stderr


def present(copy: Path, tests: tuple[str, ...]) -> tuple[str, ...]:
    """The selection without test files this revision lacks (older revisions have fewer)."""
    return tuple(test for test in tests if "/" not in test or (copy / test.split("::")[0]).exists())


def failed_tests(output: str) -> str:
    names = re.findall(r"^(?:FAILED|ERROR) (\S+)", output, re.M)
    return ", ".join(name.rsplit("/", 1)[-1] for name in names) or output.strip()[-200:]


def check_imports(copy: Path) -> None:
    """Make sure the copy's code is what runs (not the real tree's, through the editable
    install); a mutation run against the wrong code would prove nothing."""
    probe = subprocess.run(
        [str(PYTHON), "-c", "import operations.reboot as m; print(m.__file__)"],
        cwd=copy, env={**os.environ, "PYTHONPATH": str(copy)}, capture_output=True, text=True,
        check=True,
    ).stdout.strip()  # fmt: skip
    if not probe.startswith(str(copy)):
        raise SystemExit(f"mutations: the copy imports {probe}, not its own code")


def run_mutation(mutation: Mutation, rev: str, full: bool) -> Outcome:
    started = time.monotonic()
    copy = scratch_copy(rev)
    try:
        path = copy / mutation.file
        text = path.read_text() if path.exists() else ""
        if text.count(mutation.old) != 1:
            found = "not found" if mutation.old not in text else "found more than once"
            return Outcome("could not plant", f"{mutation.file}: text {found}", 0.0)
        path.write_text(text.replace(mutation.old, mutation.new))
        check_imports(copy)
        tests = present(copy, mutation.tests)
        if not full and not tests:
            return Outcome("no tests", "none of its test files is in this revision", 0.0)
        code, output = run_tests(copy, () if full else tests)
        log = LOGS / (re.sub(r"[^a-z0-9]+", "-", mutation.name.lower()).strip("-") + ".log")
        log.parent.mkdir(exist_ok=True)
        log.write_text(output)
    finally:
        cleanup(copy)
    seconds = time.monotonic() - started
    if code == 0:
        return Outcome("SURVIVED", "every selected test passed", seconds)
    if code == 1 and re.search(r"^FAILED ", output, re.M):
        return Outcome("caught", failed_tests(output), seconds)
    if code == 1:  # only errors: a fixture failed (the bug, or this machine: see the log)
        return Outcome("caught (error)", failed_tests(output), seconds)
    return Outcome(f"no verdict (pytest exit {code})", output.strip()[-300:], seconds)


def run_baseline(rev: str, selections: set[tuple[str, ...]]) -> dict[tuple[str, ...], str]:
    copy = scratch_copy(rev)
    results = {}
    try:
        check_imports(copy)
        for tests in sorted(selections):
            code, output = run_tests(copy, tests)
            results[tests] = "passes" if code == 0 else f"FAILS: {failed_tests(output)}"
            print(f"baseline {' '.join(tests)}: {results[tests]}", flush=True)
    finally:
        cleanup(copy)
    return results


def cleanup(copy: Path) -> None:
    """Stop a test fleet a failed run may have left in the copy, then delete the copy."""
    for state in (copy / ".testbed-tests",):
        if state.exists():
            subprocess.run(
                [str(PYTHON), "-m", "testbed", "down", "--purge"],
                cwd=copy,
                env={**os.environ, "PYTHONPATH": str(copy), "FLAKEFLEET_TESTBED_STATE": str(state),
                     "FLAKEFLEET_TESTBED_PORT": PORT},
                capture_output=True, check=False,
            )  # fmt: skip
    shutil.rmtree(copy, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", default="HEAD", help="the commit to mutate (default HEAD)")
    parser.add_argument("--only", action="append", default=[], help="mutations whose name has this")
    parser.add_argument("--full", action="store_true", help="run the whole suite per mutation")
    parser.add_argument("--baseline", action="store_true", help="run each selection unmutated")
    parser.add_argument("--tests", help="pytest arguments to run instead of each selection")
    parser.add_argument("--list", action="store_true", help="list the mutations and stop")
    arguments = parser.parse_args()
    mutations = [
        m for m in MUTATIONS if not arguments.only or any(o in m.name for o in arguments.only)
    ]
    if arguments.list:
        for mutation in mutations:
            print(f"{mutation.name}  ({mutation.file}; {' '.join(mutation.tests)})")
        return 0
    if arguments.baseline:
        run_baseline(arguments.rev, {m.tests for m in mutations})
    if arguments.tests:
        mutations = [replace(m, tests=tuple(shlex.split(arguments.tests))) for m in mutations]
    rows = [
        Mutation(
            "a Mac's boot identity read the Linux way only",
            "facts/nix.py",
            "2>/dev/null || sysctl -n kern.boottime | ",
            "2>/dev/null || echo no-boot-id | ",
            (UPSTREAM, "-k", "converge_first or mac_is_seen"),
        ),
    ]
    for mutation in mutations:
        outcome = run_mutation(mutation, arguments.rev, arguments.full)
        rows.append((mutation, outcome))
        print(f"{mutation.name}: {outcome.verdict} ({outcome.seconds:.0f}s) {outcome.detail}",
              flush=True)  # fmt: skip
    width = max(len(m.name) for m, _ in rows)
    print(f"\nrev {arguments.rev}:")
    print(f"{'mutation':{width}}  {'result':16}  time  caught by")
    for mutation, outcome in rows:
        detail = outcome.detail if outcome.verdict.startswith("caught") else ""
        print(f"{mutation.name:{width}}  {outcome.verdict:16}  {outcome.seconds:4.0f}s  {detail}")
    return 0 if all(o.verdict.startswith("caught") for _, o in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
