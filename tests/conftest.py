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
        digests[name] = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None
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
