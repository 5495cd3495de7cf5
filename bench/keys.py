"""Benchmark: uploading keys to a fleet, against one `rsync` per machine of the same files.

    .venv/bin/python bench/keys.py [--machines 5] [--keys 100] [--runs 3]

On a fleet of its own (.testbed-bench-keys/, port $FLAKEFLEET_TESTBED_PORT or 22970), with
N small age-encrypted keys (64 bytes each) declared for every machine, measures with a deploy
file that runs only the preflight, the keys step and the lock's release:
- the run without keys (pyinfra's start-up, connection, preflight and release: the base),
- the first upload of every key (`age` decrypts each file once for all machines),
- the no-op redeploy with the keys declared,
each as time and SSH commands per machine (sessions its sshd started); beside the floor:
the plaintext files (decrypted here beforehand, which flakefleet never does) copied with one
`rsync -a` per machine, all machines in parallel. Each time is the median of R runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import BIN, ROOT, fleet_env, run_checked
from common import testbed as fleet_testbed

STATE = ROOT / ".testbed-bench-keys"
TESTBED = fleet_env(STATE, int(os.environ.get("FLAKEFLEET_TESTBED_PORT", "22970")))

DEPLOY_FILE = """\
from flakefleet.keys import Upload
from operations import keys, preflight

secrets = keys.declared()
machine = preflight.preflight()
if machine is not None:
    keys.upload(name="Upload keys", wanted=secrets, on_machine=machine.keys,
                stage=Upload.PRE_ACTIVATION)
    preflight.release(name="Release the deploy lock")
"""


def testbed(*args: str) -> str:
    return fleet_testbed(TESTBED, *args)


def sessions(machines: list[str]) -> dict[str, int]:
    return {
        name: (STATE / "machines" / name / "console.log").read_text().count("Starting session")
        for name in machines
    }


def deploy(deploy_file: Path, keys: dict, identity: Path) -> None:
    run_checked(
        str(BIN / "pyinfra"), "-y", "inventory.py", str(deploy_file),
        "--data", f"keys={json.dumps(keys)}", "--data", f"age_identity={identity}",
        env=TESTBED,
    )  # fmt: skip


def measure(machines: list[str], action, runs: int, reset=None) -> tuple[float, float]:
    """The median time of `action` over `runs` (after `reset`, not counted), and its SSH
    commands per machine per run."""
    times, commands = [], []
    for _ in range(runs):
        if reset is not None:
            reset()
        before = sessions(machines)
        start = time.monotonic()
        action()
        times.append(time.monotonic() - start)
        after = sessions(machines)
        commands.append(statistics.mean(after[m] - before[m] for m in machines))
    return statistics.median(times), statistics.median(commands)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--machines", type=int, default=5)
    parser.add_argument("--keys", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    arguments = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-keys-"))
    try:
        testbed("down", "--purge")
        testbed("up", "--machines", str(arguments.machines))
        machines = [line.split()[0] for line in testbed("status").splitlines()]
        identity = work / "identity.txt"
        subprocess.run(["age-keygen", "-o", str(identity)], check=True, capture_output=True)
        recipient = subprocess.run(
            ["age-keygen", "-y", str(identity)], check=True, capture_output=True, text=True
        ).stdout.strip()
        plain = work / "plain"  # the floor's copy: rsync needs files
        plain.mkdir(mode=0o700)
        keys = {}
        for number in range(arguments.keys):
            content = os.urandom(32).hex().encode()
            (plain / f"key{number}").write_bytes(content)
            encrypted = work / f"key{number}.age"
            subprocess.run(["age", "-r", recipient, "-o", str(encrypted)], input=content,
                           check=True)  # fmt: skip
            keys[f"key{number}"] = {"age_file": str(encrypted)}
        deploy_file = ROOT / "deploy" / f".bench-keys-{os.getpid()}.py"
        deploy_file.write_text(DEPLOY_FILE)
        try:
            rows = {}
            rows["no keys"] = measure(machines, lambda: deploy(deploy_file, {}, identity),
                                      arguments.runs)  # fmt: skip

            config = STATE / "ssh_config"

            def forget() -> None:  # the machines hold no key: every one is uploaded
                for machine in machines:
                    forget = "rm -rf /var/lib/flakefleet/keys /run/keys"
                    run_checked("ssh", "-F", str(config), f"root@{machine}", forget, env=TESTBED)

            rows[f"upload {arguments.keys} keys"] = measure(
                machines, lambda: deploy(deploy_file, keys, identity), arguments.runs, forget
            )
            rows[f"no-op, {arguments.keys} keys declared"] = measure(
                machines, lambda: deploy(deploy_file, keys, identity), arguments.runs
            )

            def rsync(machine: str) -> None:
                subprocess.run(
                    ["rsync", "-a", "--rsh", f"ssh -F {config}", f"{plain}/",
                     f"root@{machine}:/run/keys-rsync/"], check=True, capture_output=True,
                )  # fmt: skip

            def floor() -> None:
                with ThreadPoolExecutor(len(machines)) as pool:
                    list(pool.map(rsync, machines))

            rows[f"rsync -a, {arguments.keys} files"] = measure(machines, floor, arguments.runs)
        finally:
            deploy_file.unlink()
        print(f"\n{arguments.keys} keys of 64 bytes, {len(machines)} machines, "
              f"median of {arguments.runs} runs:")  # fmt: skip
        print(f"{'':32}  {'time':>7}  SSH commands per machine")
        for label, (seconds, commands) in rows.items():
            print(f"{label:32}  {seconds:6.2f}s  {commands:g}")
    finally:
        testbed("down", "--purge")
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
