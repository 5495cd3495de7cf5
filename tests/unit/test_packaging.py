"""Everything a deploy runs is installed with flakefleet: the modules its smoke suites import
and the ones it spawns (`python -m ...`) come from runtime dependencies, not the test extra."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROJECT = {"flakefleet", "facts", "operations", "testbed", "deploy", "conftest"}


def _name(requirement: str) -> str:
    """A requirement's distribution name, normalised (`pytest-testinfra>=10` → pytest_testinfra)."""
    name = re.match(r"[A-Za-z0-9_.\-]+", requirement)
    assert name, requirement
    return re.sub(r"[-_.]+", "_", name.group(0)).lower()


def deploy_modules() -> set[str]:
    """Top-level modules the deploy path needs: imported by the smoke suites it runs, or
    spawned by an operation with `sys.executable -m <module>`."""
    modules: set[str] = set()
    for suite in (ROOT / "tests" / "smoke").glob("*.py"):
        for node in ast.walk(ast.parse(suite.read_text())):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                modules.add(node.module.split(".")[0])
    for operation in (ROOT / "operations").glob("*.py"):
        modules.update(re.findall(r'"-m",\s*"([A-Za-z0-9_]+)"', operation.read_text()))
    return {m for m in modules if m not in sys.stdlib_module_names and m not in PROJECT}


def test_everything_a_deploy_runs_is_a_runtime_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {_name(requirement) for requirement in project["dependencies"]}
    extras = {_name(r) for reqs in project["optional-dependencies"].values() for r in reqs}
    distributions = packages_distributions()
    modules = deploy_modules()
    assert {"pytest", "testinfra"} <= modules, modules  # the health gate's own tools
    missing = {
        module: distributions.get(module)
        for module in modules
        if not {_name(d) for d in distributions.get(module, [])} & runtime
    }
    assert not missing, f"deploy-path modules not in [project] dependencies: {missing}"
    # The test extra is for the project's own tests only: nothing a deploy needs is there.
    assert not runtime & extras, runtime & extras
