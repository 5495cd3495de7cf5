"""The layers hold: every remote command goes through the Target, no module keeps per-run
state of its own, and the test process is never monkey-patched by gevent."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


# What only flakefleet/target.py may do: start ssh, run a command over pyinfra's connection,
# read a fact, or wrap a command in sudo. (rsync and Nix get their ssh from the Target.)
ONLY_IN_TARGET = {
    "starts ssh": re.compile(r"""\[\s*["']ssh["']"""),
    "runs over pyinfra's connection": re.compile(r"\.run_shell_command\("),
    "reads a fact": re.compile(r"\.get_fact\("),
    "builds a pyinfra command": re.compile(r"\bStringCommand\("),
    "wraps a command in sudo": re.compile(r"\bsudo\.(wrap|gate)\("),
}
DEPLOY_CODE = ["flakefleet", "operations", "facts", "deploy"]


def test_every_remote_command_goes_through_the_target():
    found = []
    for folder in DEPLOY_CODE:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / "flakefleet" / "target.py":
                continue
            text = path.read_text()
            for what, pattern in ONLY_IN_TARGET.items():
                if pattern.search(text):
                    found.append(f"{path.relative_to(ROOT)} {what}")
    assert found == []


# Module-level state: a dict, list or set assigned at module level and changed later, or a
# `global` statement. Per-run state belongs to flakefleet.run.Run.
MUTABLE_AT_MODULE_LEVEL = re.compile(
    r"^_?[a-z_]+(: [^=]+)? = (\{\}|\[\]|set\(\)|dict\(\)|list\(\))", re.MULTILINE
)


def test_no_module_keeps_state_of_its_own():
    found = []
    for folder in DEPLOY_CODE:
        for path in sorted((ROOT / folder).rglob("*.py")):
            text = path.read_text()
            if MUTABLE_AT_MODULE_LEVEL.search(text) or re.search(r"^\s+global ", text, re.M):
                found.append(str(path.relative_to(ROOT)))
    assert found == []


def test_no_test_process_imports_pyinfras_command_line():
    """`import pyinfra_cli` monkey-patches the whole process with gevent: a test's threads
    (the sudo test's process watch) then starve its pexpect session. Only the smoke suites,
    which run in a process of their own, may read the inventory through it."""
    found = [
        str(path.relative_to(ROOT))
        for path in sorted((ROOT / "tests").rglob("*.py"))
        if "smoke" not in path.parts
        and re.search(r"^\s*(from|import) pyinfra_cli", path.read_text(), re.MULTILINE)
    ]
    assert found == []
