"""Benchmark: syncing a large source to a machine, against plain `rsync -a` over the same SSH.

    .venv/bin/python bench/sources.py [--runs R] [--files N] [--size BYTES] [--machine mac1]

On a fleet of its own (.testbed-bench-sources/, port 22950), with a tree of 50 MB in 5,000
files of random data by default, sent to web1 (reached as root) or mac1 (reached as `deploy`,
whose sudo asks for a password: rsync runs under sudo through flakefleet's relay), measures:
- the first sync (the machine has nothing), the no-op sync and a sync after changing one file,
  each as time and bytes sent to the machine;
- flakefleet's sources step as pyinfra runs it (start-up, connection, the preflight, the
  local digest, rsync, the install command, the lock's release), beside `rsync -a` of the
  same tree to the same machine (the floor), which knows nothing of atomic swaps, digests or
  other sources.
Bytes are counted on the wire: every SSH connection of both (pyinfra's paramiko one and each
ssh of rsync) goes through a counting TCP relay, so they include SSH's own overhead.
Each figure is the median of R runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml
from common import BIN, ROOT, fleet_env, run_checked
from common import testbed as fleet_testbed

sys.path.insert(0, str(ROOT))

from flakefleet.sources import list_tree, tree_digest
from flakefleet.target import Target

STATE = ROOT / ".testbed-bench-sources"
TESTBED = fleet_env(STATE, 22950)


def sh(*argv: str, env: dict[str, str] | None = None) -> str:
    return run_checked(*argv, env=env or TESTBED)


def testbed(*args: str) -> str:
    return fleet_testbed(TESTBED, *args)


RELAY_PORT = 22959
SOURCE = "bench"

# A TCP relay in front of the machine's sshd: every connection through it (pyinfra's paramiko
# one, each ssh of rsync) is counted, in a status file rewritten as connections open and close.
RELAY = """\
import json, os, socket, sys, threading
port, target, status = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
totals = {"sent": 0, "received": 0, "open": 0}
lock = threading.Lock()


def save():
    with open(status + ".new", "w") as stream:
        json.dump(totals, stream)
    os.replace(status + ".new", status)


def pump(source, destination, key):
    while data := source.recv(65536):
        destination.sendall(data)
        with lock:
            totals[key] += len(data)
    try:
        destination.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def serve(client):
    server = socket.create_connection(("127.0.0.1", target))
    with lock:
        totals["open"] += 1
        save()
    pumps = [threading.Thread(target=pump, args=(client, server, "sent")),
             threading.Thread(target=pump, args=(server, client, "received"))]
    for thread in pumps:
        thread.start()
    for thread in pumps:
        thread.join()
    client.close()
    server.close()
    with lock:
        totals["open"] -= 1
        save()


listener = socket.create_server(("127.0.0.1", port))
save()
while True:
    client, _ = listener.accept()
    threading.Thread(target=serve, args=(client,), daemon=True).start()
"""

# The sources step as deploy/site.py runs it, between the preflight (lock, the machine's state
# read as root, the sudo password) and the lock's release, without the other steps.
DEPLOY_FILE = """\
from operations import preflight, sources

machine = preflight.preflight()
if machine is not None:
    sources.sync(name="Sync the sources", wanted=sources.declared(), var_src=machine.var_src)
    preflight.release(name="Release the deploy lock")
"""


class Wire:
    """Counts the bytes sent to the machine by every SSH connection made through the relay."""

    def __init__(self, machine_port: int) -> None:
        self.port = RELAY_PORT
        self.machine_port = machine_port
        self.status = STATE / "relay.json"
        self.fleet_file = STATE / "fleet-relayed.yaml"
        self.known_hosts = STATE / "known_hosts-relayed"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the relay, and a fleet file and known_hosts that reach the machine through it."""
        script = STATE / "relay.py"
        script.write_text(RELAY)
        self.process = subprocess.Popen(
            [sys.executable, str(script), str(self.port), str(self.machine_port), str(self.status)]
        )
        while not self.status.exists():
            time.sleep(0.05)
        known = (STATE / "known_hosts").read_text()
        self.known_hosts.write_text(
            known.replace(f"[127.0.0.1]:{self.machine_port}", f"[127.0.0.1]:{self.port}")
        )
        fleet = yaml.safe_load((STATE / "fleet.yaml").read_text())
        fleet["ssh"]["known_hosts"] = self.known_hosts.name
        for entry in fleet["machines"]:
            if entry["port"] == self.machine_port:
                entry["port"] = self.port
        self.fleet_file.write_text(yaml.safe_dump(fleet))

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait()

    def totals(self) -> dict[str, int]:
        """The relay's totals once every connection through it has closed."""
        deadline = time.monotonic() + 5
        while True:
            totals = json.loads(self.status.read_text())
            if totals["open"] == 0 or time.monotonic() > deadline:
                return totals
            time.sleep(0.02)

    def measure(self, argv: list[str], env: dict[str, str]) -> tuple[float, int]:
        """Run a command; returns its time and the bytes its SSH connections sent."""
        before = self.totals()["sent"]
        start = time.monotonic()
        sh(*argv, env=env)
        elapsed = time.monotonic() - start
        return elapsed, self.totals()["sent"] - before


def write_tree(tree: Path, files: int, size: int) -> None:
    generator = random.Random(1)
    for index in range(files):
        folder = tree / f"dir{index % 50:02}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"file{index:05}.bin").write_bytes(generator.randbytes(size))


def change_one_file(tree: Path, run: int) -> None:
    path = sorted(tree.glob("dir*/file*.bin"))[run * 97 % 1000]
    path.write_bytes(random.Random(run + 100).randbytes(path.stat().st_size))


Results = dict[str, dict[str, list[tuple[float, int]]]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--size", type=int, default=10_000, help="bytes per file")
    parser.add_argument(
        "--machine", choices=("web1", "mac1"), default="web1",
        help="web1 is reached as root; mac1 as deploy, whose sudo asks for a password",
    )  # fmt: skip
    args = parser.parse_args()

    testbed("down", "--purge")
    roster = list(json.loads((ROOT / "example" / "hosts.json").read_text()))
    testbed("up", "--machines", str(roster.index(args.machine) + 1))
    fleet = yaml.safe_load((STATE / "fleet.yaml").read_text())
    entry = next(m for m in fleet["machines"] if m["name"] == args.machine)
    wire = Wire(entry["port"])
    wire.start()
    try:
        results, digests, remote = run(wire, fleet, entry, args)
    finally:
        wire.stop()
        testbed("down", "--purge")
    show(results, digests, remote, args)


def run(wire: Wire, fleet: dict, entry: dict, args: argparse.Namespace):
    """Each scenario R times, flakefleet then the floor, on the same tree."""
    tree = STATE / "tree"
    write_tree(tree, args.files, args.size)
    deploy_file = STATE / "sources_only.py"
    deploy_file.write_text(DEPLOY_FILE)
    declared = {SOURCE: {"type": "file", "path": str(tree)}, "web-app-dist": None}
    flakefleet = [
        str(BIN / "pyinfra"), "-y", "inventory.py", str(deploy_file), "--limit", entry["name"],
        "--data", "flake=", "--data", f"sources={json.dumps(declared)}",
    ]  # fmt: skip
    flakefleet_env = {**os.environ, "FLAKEFLEET_FLEET": str(wire.fleet_file)}
    data = {  # the same SSH as flakefleet's: through the relay, with the fleet's key
        "ssh_key": str(STATE / fleet["ssh"]["key"]),
        "ssh_known_hosts_file": str(wire.known_hosts),
        "ssh_strict_host_key_checking": "yes",
        "ssh_port": wire.port,
        "ssh_hostname": entry["address"],
        "ssh_user": entry["user"],
    }
    target = Target.from_data(entry["name"], data)
    floor = ["rsync", "-a", "-e", shlex.join(["ssh", *target.ssh_options()]), f"{tree}/",
             f"{target.destination}:/var/tmp/floor/"]  # fmt: skip
    as_root = ["ssh", "-F", str(STATE / "ssh_config"), entry["name"]]

    results: Results = {}

    def record(scenario: str, who: str, value: tuple[float, int]) -> None:
        results.setdefault(scenario, {}).setdefault(who, []).append(value)

    digests = []
    empty = STATE / "empty"
    empty.mkdir(exist_ok=True)
    for number in range(args.runs):
        sh(*as_root, "rm -rf /var/src /var/tmp/floor")
        record("first sync", "flakefleet", wire.measure(flakefleet, flakefleet_env))
        record("first sync", "rsync", wire.measure(floor, os.environ.copy()))
        record("no-op sync", "flakefleet", wire.measure(flakefleet, flakefleet_env))
        record("no-op sync", "rsync", wire.measure(floor, os.environ.copy()))
        change_one_file(tree, number)
        record("one file changed", "flakefleet", wire.measure(flakefleet, flakefleet_env))
        record("one file changed", "rsync", wire.measure(floor, os.environ.copy()))
        start = time.monotonic()
        tree_digest(tree, list_tree(tree, (), (), empty), checksum=False)
        digests.append(time.monotonic() - start)
    return results, digests, sh(*as_root, f"readlink /var/src/{SOURCE}").strip()


def show(results: Results, digests: list[float], remote: str, args: argparse.Namespace) -> None:
    megabytes = args.files * args.size / 1e6
    print(
        f"flakefleet sources benchmark: {megabytes:.0f} MB in {args.files} files to "
        f"{args.machine}, median of {args.runs} runs"
    )
    print(f"{'':18}{'flakefleet':>22}{'plain rsync -a':>22}{'ratio':>16}")
    print(f"{'':18}{'time':>10}{'sent':>12}{'time':>10}{'sent':>12}{'time':>8}{'bytes':>8}")
    for scenario, by in results.items():
        ours_time = statistics.median(t for t, _ in by["flakefleet"])
        ours_bytes = statistics.median(b for _, b in by["flakefleet"])
        base_time = statistics.median(t for t, _ in by["rsync"])
        base_bytes = statistics.median(b for _, b in by["rsync"])
        print(
            f"{scenario:18}{ours_time:>9.2f}s{human(ours_bytes):>12}{base_time:>9.2f}s"
            f"{human(base_bytes):>12}{ours_time / base_time:>7.1f}x{ours_bytes / base_bytes:>7.2f}x"
        )
    print(f"(part of every flakefleet run: the local digest of the tree, "
          f"{statistics.median(digests):.2f}s)")  # fmt: skip
    print(f"(on the machine: /var/src/{SOURCE} -> {remote})")


def human(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000:
            return f"{count:.1f} {unit}" if unit != "B" else f"{count:.0f} B"
        count /= 1000
    return f"{count:.1f} TB"


if __name__ == "__main__":
    main()
