"""Suite-wide guard: the test fleet must never write the real machine's own files; and the
tiers that need a test fleet never pass unnoticed by skipping."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

# bin/test runs the modules in two pytest-xdist workers side by side: each worker gets test
# fleets of its own (state directory and ports), as a developer's .testbed/ keeps its own.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if _WORKER.startswith("gw") and _WORKER != "gw0":
    _OFFSET = 1000 * int(_WORKER.removeprefix("gw"))
    _ROOT = Path(__file__).resolve().parents[1]
    os.environ.setdefault("FLAKEFLEET_TEST_STATE", str(_ROOT / f".testbed-tests-{_WORKER}"))
    os.environ.setdefault("FLAKEFLEET_TEST_PORT", str(22700 + _OFFSET))
    os.environ.setdefault("FLAKEFLEET_TESTBED_TEST_PORT", str(22600 + _OFFSET))

# Files a test fleet that leaked out of its namespaces would change first.
GUARDED = [
    "/etc/passwd",
    "/etc/group",
    "/etc/shadow",
    "/etc/hosts",
    "/etc/sudoers",
    "/etc/nix/nix.conf",
    "/usr/bin/nix",  # the darwin imitation hides it inside its machine only
    "/usr/libexec/nix/build-remote",
    "/root/.ssh/config",
    "/root/.ssh/known_hosts",
    "/root/.ssh/authorized_keys",
]
GUARDED_DIRECTORIES = [
    "/var/src",
    "/nix/var/nix/profiles/system",
    "/nix/var/nix/profiles/default/bin",
    "/run/current-system",
    "/usr/bin/nix-store",
]


# Directories whose entries must stay as they were: a test (or a test machine, which shares
# the real / outside its own mounts) that creates e.g. /nonexistent shows up here.
LISTED = ["/", "/usr", "/usr/local", "/usr/local/bin", "/opt", "/home", "/srv", "/mnt", "/media"]


def _snapshot() -> dict[str, str | None]:
    digests: dict[str, str | None] = {}
    for name in LISTED:
        path = Path(name)
        entries = sorted(entry.name for entry in path.iterdir()) if path.is_dir() else None
        digests[f"{name} (entries)"] = None if entries is None else "\n".join(entries)
    for name in GUARDED:
        path = Path(name)
        try:
            digests[name] = hashlib.sha256(path.read_bytes()).hexdigest()
        except FileNotFoundError:
            digests[name] = None
        except PermissionError:  # not root: a user who cannot read it cannot write it either
            digests[name] = "unreadable"
    for name in GUARDED_DIRECTORIES:
        digests[name] = "present" if Path(name).exists() or Path(name).is_symlink() else None
    return digests


@pytest.fixture(scope="session", autouse=True)
def real_machine_untouched():
    """Fails the run if anything the suite did changed the real /etc, /root, /var/src,
    created a system profile in the real /nix, or added or removed an entry of /, /usr, /opt,
    /home and the like."""
    before = _snapshot()
    yield
    after = _snapshot()
    changed = sorted(name for name in before if before[name] != after[name])
    details = [_difference(name, before[name], after[name]) for name in changed]
    assert not changed, f"the real machine's files changed: {'; '.join(details)}"


def _difference(name: str, before: str | None, after: str | None) -> str:
    if not name.endswith("(entries)") or before is None or after is None:
        return name
    old, new = set(before.splitlines()), set(after.splitlines())
    directory = name.removesuffix(" (entries)").rstrip("/")
    return ", ".join(
        [f"{directory}/{entry} appeared" for entry in sorted(new - old)]
        + [f"{directory}/{entry} vanished" for entry in sorted(old - new)]
    )


# The test fleet needs root (namespaces, mounts), util-linux, OpenSSH's server and Nix. Without
# them its tiers skip (tests/testbed) or fail (tests/integration); bin/test sets this variable
# so that such a run fails at once instead of passing on the unit tests alone.
REQUIRE_FLEET = "FLAKEFLEET_REQUIRE_FLEET"
FLEET_TOOLS = ("/usr/bin/unshare", "/usr/sbin/sshd", "/usr/bin/nix")
FLEET_SKIP = "the test fleet needs root"  # how its skips begin (tests/testbed)


def fleet_unavailable() -> str | None:
    """Why this computer cannot run a test fleet, or None."""
    if os.geteuid() != 0:
        return "not running as root"
    missing = [tool for tool in FLEET_TOOLS if not Path(tool).exists()]
    return f"missing {', '.join(missing)}" if missing else None


def pytest_sessionstart(session: pytest.Session) -> None:
    reason = fleet_unavailable()
    if reason and os.environ.get(REQUIRE_FLEET):
        pytest.exit(
            f"flakefleet: the test fleet cannot run here ({reason}), and {REQUIRE_FLEET} "
            "says its tiers must run",
            returncode=1,
        )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    skipped = [
        report
        for report in terminalreporter.stats.get("skipped", [])
        if FLEET_SKIP in str(getattr(report, "longrepr", ""))
    ]
    if skipped:
        terminalreporter.section("THE TEST FLEET TIERS DID NOT RUN", sep="!", red=True, bold=True)
        terminalreporter.line(
            f"{len(skipped)} tests needing a test fleet were SKIPPED ({fleet_unavailable()}): "
            "this run says nothing about them. Run bin/test as root.",
            red=True,
            bold=True,
        )
