"""The deploy lock's shell commands, run for real with `sh` in a directory standing for
/run/flakefleet: one winner among racing takeovers, all-or-nothing acquisition, and a lock
nobody can read taken over once it is old."""

from __future__ import annotations

import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from flakefleet.lock import (
    ORPHAN_SECONDS,
    Holder,
    acquire_command,
    release_command,
    state_dir_command,
    status_command,
    take_over_command,
)

DEAD = Holder("controller", 4242, "1", int(time.time()) - 3600)


def sh(command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", command], capture_output=True, text=True)


def test_of_many_racing_takeovers_exactly_one_wins(tmp_path):
    (tmp_path / "lock").mkdir()
    (tmp_path / "lock" / "holder").write_text(f"{DEAD}\n")
    racers = [Holder("controller", pid, "1", int(time.time())) for pid in range(1, 301)]
    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(
            pool.map(lambda me: sh(take_over_command(str(tmp_path), str(DEAD), me)), racers)
        )
    winners = [me for me, result in zip(racers, results, strict=True) if result.returncode == 0]
    assert len(winners) == 1
    assert all("lock acquired" not in r.stdout for r in results if r.returncode != 0)
    assert (tmp_path / "lock" / "holder").read_text().strip() == str(winners[0])
    assert not (tmp_path / "lock" / "takeover").exists()


def test_the_lock_is_taken_only_if_nobody_took_it_since_the_machine_was_read(tmp_path):
    """The preflight reads the lock free with its serial; the first change takes it only if
    no deploy held it in between (it could have changed what the preflight read)."""
    me = Holder("controller", 1, "1", int(time.time()))
    other = Holder("controller", 2, "1", int(time.time()))
    seen = sh(status_command(str(tmp_path))).stdout.strip()
    assert seen == "lock free"  # no deploy since boot
    sh(acquire_command(str(tmp_path), other, ""))  # another deploy, from start to end
    assert sh(status_command(str(tmp_path))).stdout.strip() == f"lock held {other}"
    sh(release_command(str(tmp_path), other))
    assert sh(status_command(str(tmp_path))).stdout.strip() == f"lock free {other}"

    late = sh(acquire_command(str(tmp_path), me, seen.removeprefix("lock free").strip()))
    assert late.stdout.strip() == "lock changed"
    assert not (tmp_path / "lock").exists()
    taken = sh(acquire_command(str(tmp_path), me, str(other)))
    assert taken.stdout.strip() == "lock acquired"
    assert (tmp_path / "lock" / "holder").read_text().strip() == str(me)
    again = sh(acquire_command(str(tmp_path), other, str(me))).stdout.strip()
    assert again == f"lock held {me}"


def test_acquiring_is_all_or_nothing_when_the_holder_cannot_be_written(tmp_path):
    """/run full: the lock directory can be made, its holder not. Run in a private mount
    namespace on a tmpfs that is full (root, as the test fleet is)."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root (a tmpfs in a private mount namespace)")
    script = (
        f"mount -t tmpfs -o size=16k tmpfs {tmp_path} && "
        f"dd if=/dev/zero of={tmp_path}/fill bs=4k 2>/dev/null; "
        f"{acquire_command(str(tmp_path), 'me:1:2:3')}; ls {tmp_path}"
    )
    completed = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    lines = completed.stdout.split()
    assert f"{tmp_path}/lock/holder" in completed.stdout and lines[0:2] == ["lock", "failed:"]
    assert "lock" not in lines[-1:]  # the lock was removed again: only `fill` is left
    assert lines[-1] == "fill"


def test_a_lock_without_a_readable_holder_is_stale_once_old(tmp_path):
    (tmp_path / "lock").mkdir()
    fresh = sh(acquire_command(str(tmp_path), "me:1:2:3")).stdout.strip()
    assert fresh.startswith("lock held ")
    young = Holder.parse(fresh.removeprefix("lock held"))
    assert young is not None and young.unknown and not young.is_dead()
    old = time.time() - ORPHAN_SECONDS - 5
    os.utime(tmp_path / "lock", (old, old))
    aged = Holder.parse(sh(acquire_command(str(tmp_path), "me")).stdout.removeprefix("lock held"))
    assert aged is not None and aged.is_dead()
    me = Holder("controller", 1, "1", int(time.time()))
    taken = sh(take_over_command(str(tmp_path), str(aged), me))
    assert taken.stdout.strip() == "lock acquired"


def test_the_state_directory_must_be_the_users_own(tmp_path):
    mine = tmp_path / "mine"
    assert sh(state_dir_command(str(mine))).stdout == ""
    assert (mine / "activation").is_dir()
    open_to_all = tmp_path / "planted"
    open_to_all.mkdir(mode=0o777)
    open_to_all.chmod(0o777)
    refused = sh(state_dir_command(str(open_to_all))).stdout
    assert refused.startswith(f"lock failed: {open_to_all} must belong to ")
    assert refused.rstrip().endswith("and be writable by nobody else")


def test_the_state_directory_is_private_whatever_the_login_umask(tmp_path):
    """Debian and Fedora give a user with a group of its own umask 002 (pam_umask's
    usergroups): the directory flakefleet makes must still be the user's alone."""
    made = tmp_path / "made"
    assert sh(f"umask 002; {state_dir_command(str(made))}").stdout == ""
    assert made.stat().st_mode & 0o777 == 0o700
    assert (made / "activation").stat().st_mode & 0o777 == 0o700


def test_a_holder_names_who_holds_it():
    holder = Holder.parse("laptop:4242:1234:1700000000")
    assert holder is not None and holder.name == "laptop:4242" and not holder.unknown
    assert Holder.parse("garbage") is None
    assert not Holder.this_process().is_dead() and Holder.this_process().is_alive_here()


def test_the_state_directory_check_reads_the_owner(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    os.chown(other, 65534, 65534) if os.geteuid() == 0 else pytest.skip("needs root to chown")
    assert sh(state_dir_command(str(other))).stdout.startswith("lock failed:")
    assert Path(other).stat().st_uid == 65534
