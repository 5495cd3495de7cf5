"""Benchmark: closure transfer at fleet scale, cold, on a test fleet of its own.

    .venv/bin/python bench/closure.py [--machines 10] [--size 200000000]

Ten machines (by default) share one closure of about 200 MB (the example flake's `blobSize`
knob: one random blob every system links to). Each method starts from empty machines:

- direct: flakefleet's default, the closure copied to every machine in parallel over ssh;
- cache: flakefleet's fan-out, the closure uploaded once to a file:// binary cache (served
  over HTTP on 127.0.0.1 for the run), every machine fetching it in parallel;
- sequential: one `nix copy --to ssh://...` per machine, one after the other (how deploy-rs
  and krops-style scripts push).

It reports wall time and the bytes the controller uploaded: everything its SSH connections sent
(counted by a ProxyCommand that relays and counts, since Nix kills its ssh before ssh can
report), plus what it wrote into the cache, which stands for the upload to a cache host.
The fleet lives in .testbed-bench-closure/ (ports 2298x) and is purged at the end, with the
bench's flake copy and cache; the blob stays in the controller's store only if something else
still uses it.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml
from common import BIN, NIX, ROOT, fleet_env, run_checked
from common import testbed as fleet_testbed

from flakefleet.builds import gcroot

STATE = ROOT / ".testbed-bench-closure"
WORK = ROOT / ".testbed-bench-closure-work"  # the flake copy, cache and byte counts
ENV = fleet_env(STATE, 22980)


def sh(*argv: str, env: dict[str, str] | None = None) -> str:
    return run_checked(*argv, env=env or ENV)


def testbed(*args: str) -> str:
    return fleet_testbed(ENV, *args)


CACHE_PORT = 22979


# -- counting what the controller sends --------------------------------------------------------


def proxy(host: str, port: str, log: str) -> None:
    """ssh's ProxyCommand: relay stdin/stdout to host:port, then log the bytes sent."""
    counts = [0, 0]  # sent, received

    def report(*_: object) -> None:
        with open(log, "a") as stream:
            stream.write(f"{counts[0]} {counts[1]}\n")
        os._exit(0)

    signal.signal(signal.SIGTERM, report)
    signal.signal(signal.SIGHUP, report)
    connection = socket.create_connection((host, int(port)))
    selector = selectors.DefaultSelector()
    selector.register(sys.stdin.fileno(), selectors.EVENT_READ)
    selector.register(connection, selectors.EVENT_READ)
    try:
        _relay(connection, selector, counts)
    finally:  # EOF, a broken pipe or any error: the count is logged all the same
        report()


def _relay(connection: socket.socket, selector: selectors.BaseSelector, counts: list[int]) -> None:
    while True:
        for key, _ in selector.select():
            if key.fileobj is connection:
                data = connection.recv(1 << 16)
                if not data:
                    return
                counts[1] += len(data)
                os.write(sys.stdout.fileno(), data)
            else:
                data = os.read(sys.stdin.fileno(), 1 << 16)
                if not data:
                    return
                connection.sendall(data)
                counts[0] += len(data)


def ssh_bytes(log: Path) -> int:
    if not log.exists():
        return 0
    return sum(int(line.split()[0]) for line in log.read_text().splitlines() if line.strip())


def counted_fleet(log: Path) -> Path:
    """Route every SSH connection to the fleet (pyinfra's, rsync's, Nix's) through the
    counting proxy: machines are reached by a Host alias whose ProxyCommand names the port
    (paramiko does not pass %p on), and the fleet file points at that ssh_config."""
    config = WORK / "ssh_config"
    machines = json.loads((STATE / "machines.json").read_text())
    config.write_text(
        "".join(
            f"Host {m['name']}\n  HostName 127.0.0.1\n  Port {m['port']}\n"
            f"  HostKeyAlias {m['name']}\n"
            f"  ProxyCommand {sys.executable} {Path(__file__).resolve()} proxy 127.0.0.1"
            f" {m['port']} {log}\n"
            for m in machines
        )
    )
    fleet_file = STATE / "fleet.yaml"
    fleet = yaml.safe_load(fleet_file.read_text())
    fleet["ssh"]["config"] = str(config)
    for machine in fleet["machines"]:
        machine["address"] = machine["name"]
        machine.pop("port", None)
    fleet_file.write_text(yaml.safe_dump(fleet))
    return config


# -- the fleet and its flake -------------------------------------------------------------------


def make_flake(machines: int, size: int) -> tuple[Path, list[str]]:
    flake = WORK / "example"
    shutil.copytree(ROOT / "example", flake)
    names = [f"bench{i:02d}" for i in range(1, machines + 1)]
    hosts = {
        name: {"class": "nixos", "roles": [], "version": "1", "blobSize": size} for name in names
    }
    (flake / "hosts.json").write_text(json.dumps(hosts, indent=2))
    return flake, names


def build_all(flake: Path, names: list[str]) -> tuple[list[str], list[str]]:
    """Each machine's system and derivation."""
    attributes = [
        f"path:{flake}#nixosConfigurations.{name}.config.system.build.toplevel" for name in names
    ]
    built = json.loads(sh(*NIX, "build", "--no-link", "--json", *attributes))
    return [entry["outputs"]["out"] for entry in built], [entry["drvPath"] for entry in built]


def fresh_fleet(flake: Path) -> None:
    testbed("down", "--purge")
    testbed("up", "--roster", str(flake / "hosts.json"))


# -- the methods -------------------------------------------------------------------------------


def flakefleet(flake: Path, *data: str) -> float:
    start = time.monotonic()
    args = [arg for item in ("goal=build", f"flake={flake}", *data) for arg in ("--data", item)]
    sh(str(BIN / "pyinfra"), "-y", "inventory.py", "deploy/site.py", *args)
    return time.monotonic() - start


def sequential(config: Path, names: list[str], systems: list[str]) -> float:
    key = STATE / "keys" / "id_ed25519"
    options = (
        f"-F {config} -i {key} -o IdentitiesOnly=yes -o BatchMode=yes "
        f"-o UserKnownHostsFile={STATE / 'known_hosts'} -o StrictHostKeyChecking=yes"
    )
    start = time.monotonic()
    for name, system in zip(names, systems, strict=True):
        sh(*NIX, "copy", "--to", f"ssh://root@{name}", system, env={**ENV, "NIX_SSHOPTS": options})
    return time.monotonic() - start


def directory_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def run(method: str, flake: Path, names: list[str], systems: list[str]) -> tuple[float, int, int]:
    """Wall seconds, bytes over SSH, bytes into the cache."""
    fresh_fleet(flake)
    log = WORK / f"{method}.bytes"
    config = counted_fleet(log)
    cache = WORK / "cache"
    if method == "direct":
        seconds = flakefleet(flake)
    elif method == "cache":
        setting = {
            "store": f"file://{cache}?compression=none",
            "url": f"http://127.0.0.1:{CACHE_PORT}",
            "serve": True,
        }
        seconds = flakefleet(flake, f"cache={json.dumps(setting)}")
    else:
        seconds = sequential(config, names, systems)
    for name, system in zip(names, systems, strict=True):  # every machine got its closure
        sh("ssh", "-F", str(STATE / "ssh_config"), name, f"nix-store --check-validity {system}")
    return seconds, ssh_bytes(log), directory_bytes(cache) if cache.exists() else 0


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "proxy":
        proxy(*sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machines", type=int, default=10)
    parser.add_argument("--size", type=int, default=200_000_000, help="bytes of the shared blob")
    args = parser.parse_args()

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir()
    flake, names = make_flake(args.machines, args.size)
    systems: list[str] = []
    own: list[str] = []
    drvs: list[str] = []
    try:
        started = time.monotonic()
        systems, drvs = build_all(flake, names)
        closure = sh("nix-store", "--query", "--requisites", *systems).split()
        size = int(sh(*NIX, "path-info", "--closure-size", systems[0]).split()[-1])
        own = own_paths([*systems, *drvs])
        print(
            f"{len(names)} machines, closure {size / 1e6:.1f} MB each ({len(set(closure))} paths"
            f" in all), built in {time.monotonic() - started:.1f} s (not counted)"
        )
        print(f"{'method':<12} {'wall s':>8} {'ssh MB sent':>12} {'cache MB':>9} {'total MB':>9}")
        for method in ("direct", "cache", "sequential"):
            seconds, sent, cached = run(method, flake, names, systems)
            total = sent + cached
            print(
                f"{method:<12} {seconds:>8.1f} {sent / 1e6:>12.1f} {cached / 1e6:>9.1f}"
                f" {total / 1e6:>9.1f}"
            )
            shutil.rmtree(WORK / "cache", ignore_errors=True)
    finally:
        testbed("down", "--purge")
        for name in names:  # the controller's GC roots of the bench machines
            gcroot(ROOT, Path(ENV["FLAKEFLEET_FLEET"]), name).unlink(missing_ok=True)
        shutil.rmtree(WORK, ignore_errors=True)
        if systems:  # this bench's own paths go, unless something else still uses them
            for paths in (systems, own, drvs, own):  # dependents first
                subprocess.run(["nix-store", "--delete", *paths], capture_output=True, check=False)


def own_paths(paths: list[str]) -> list[str]:
    """The bench's etc paths and its blob, and their derivations (the shared fleet-sw stays)."""
    closure = sh("nix-store", "--query", "--requisites", *paths).split()
    return [path for path in closure if "-etc-bench" in path or "-blob-" in path]


if __name__ == "__main__":
    main()
