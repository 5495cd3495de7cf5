"""Suite-wide guard: the test fleet must never write the real machine's own files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

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


def _snapshot() -> dict[str, str | None]:
    digests: dict[str, str | None] = {}
    for name in GUARDED:
        path = Path(name)
        digests[name] = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None
    for name in GUARDED_DIRECTORIES:
        digests[name] = "present" if Path(name).exists() or Path(name).is_symlink() else None
    return digests


@pytest.fixture(scope="session", autouse=True)
def real_machine_untouched():
    """Fails the run if anything the suite did changed the real /etc, /root, /var/src or
    created a system profile in the real /nix."""
    before = _snapshot()
    yield
    after = _snapshot()
    changed = {name for name in before if before[name] != after[name]}
    assert not changed, f"the real machine's files changed: {sorted(changed)}"
