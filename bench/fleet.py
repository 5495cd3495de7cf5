"""Benchmark: flakefleet at fleet scale and latency, beside the floor and the naive loop.

    .venv/bin/python bench/fleet.py [--machines 1,10,30] [--latency 0,50] [--light]

For each fleet size (the example's machines repeated in its proportions of roles and classes:
web1; web1..home1 + web3..; see `python -m testbed up --machines`) and each round trip (every
machine is reached through its relay, which adds the latency and counts the bytes), on fresh
test fleets of the same machines:

- flakefleet: cold deploy (empty machines), no-op redeploy (smoke checks included), the no-op
  without checks (`check_unchanged=False`: the deploy's own part), and one machine changed
  (web1's version);
- the floor: cold, `rsync` of the flake and `nix copy` of each system to every machine at once;
  no-op, `pyinfra inventory.py exec -- true`; one machine changed, the flake rsynced to every
  machine and web1's new system copied, at once;
- the naive way, cold: one machine after the other, rsync the flake to /var/src/config, build
  its system, `nix copy` it and switch to it (krops, deploy-rs, hand scripts).

Each run gives wall time, SSH sessions (commands) and logins (connections) per machine (counted
in each sshd's log), a deploy's own SSH commands per machine (from its run record,
`.flakefleet/runs/`: the smoke checks' are not among them), bytes the controller sent (through
the relays), the controller's peak memory (the largest process of the run, pyinfra or a Nix
it started: wait4's maxrss), and CPU time: the controller's (the command and every process it
waited for: pytest, Nix, ssh, rsync) and the rest of this computer's (the test machines, their
sshd, the relays: on a real fleet, the machines' own CPUs). On this computer both share its
cores, so a run whose wall time is bound by CPU shows it here. It prints a Markdown table,
ratios first, and writes bench/results/fleet-<date>.json. The fleet lives in
.testbed-bench-fleet/ on $FLAKEFLEET_BENCH_PORT (default 22900) and is purged at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from common import BIN, NIX, ROOT, fleet_env
from common import testbed as fleet_testbed

from flakefleet.records import RUNS
from testbed.layout import StatePaths
from testbed.roster import Machine, load_record

STATE = ROOT / ".testbed-bench-fleet"
WORK = ROOT / ".testbed-bench-fleet-work"  # the flake copy and each run's output
ENV = fleet_env(STATE, int(os.environ.get("FLAKEFLEET_BENCH_PORT") or 22900))
RESULTS = ROOT / "bench" / "results"
CHANGED = "web1"  # the machine "one machine changed" changes
DARWIN_NIX = "/nix/var/nix/profiles/default/bin"  # a Mac's Nix, on no login's PATH
# Where each class's system is in the flake (as a user's own script would name it).
ATTRIBUTES = {
    "nixos": "nixosConfigurations.{name}.config.system.build.toplevel",
    "darwin": "darwinConfigurations.{name}.system",
    "home": 'homeConfigurations."{user}@{name}".activationPackage',
}


@dataclass
class Run:
    """One measured command on the whole fleet."""

    seconds: float
    sessions_per_machine: float  # SSH sessions the machines' sshd started, on average
    logins_per_machine: float  # SSH logins (connections) the machines' sshd accepted
    sessions_most: int  # on the machine with the most
    commands_per_machine: float | None  # a deploy's own SSH commands (None: not a deploy)
    sent_bytes: int  # by the controller, through the relays
    received_bytes: int
    peak_rss_mib: float  # the largest process of the run
    controller_cpu_seconds: float  # user + system, the command and the processes it waited for
    other_cpu_seconds: float  # the rest of this computer's: the test machines, sshd, relays
    failed: list[str]  # what went wrong (a failed deploy's failed machines), empty if nothing


def testbed(*args: str) -> str:
    return fleet_testbed(ENV, *args)


def relays_settled(machines: list[Machine], timeout: float = 15.0) -> None:
    """Wait until every relay has seen its connections close (half a round trip late)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(StatePaths(STATE).machine(m.name).relayed_bytes()[2] for m in machines):
            return
        time.sleep(0.05)


def counters(machines: list[Machine]) -> dict[str, tuple[int, int, int, int]]:
    """Per machine: sessions so far, bytes sent to it, bytes received from it, logins."""
    relays_settled(machines)
    time.sleep(0.3)  # a systemd machine's journal reaches its console log a moment later
    result = {}
    for machine in machines:
        paths = StatePaths(STATE).machine(machine.name)
        sent, received, _ = paths.relayed_bytes()
        result[machine.name] = (paths.ssh_sessions(), sent, received, paths.ssh_logins())
    return result


def run_records() -> dict[Path, int]:
    """The size of each of the controller's run record files."""
    return {path: path.stat().st_size for path in (ROOT / RUNS).glob("*.jsonl")}


def deploy_commands(before: dict[Path, int]) -> float | None:
    """The SSH commands a machine, on average, of the deploy recorded since `before`."""
    counts = []
    for path in run_records():
        with path.open() as stream:
            stream.seek(before.get(path, 0))
            counts += [json.loads(line)["commands"] for line in stream if line.strip()]
    return round(sum(counts) / len(counts), 1) if counts else None


def measure(label: str, argv: list[str], machines: list[Machine]) -> Run:
    """Run a command against the fleet and measure it; a failure ends the benchmark."""
    before = counters(machines)
    records = run_records()
    log = WORK / "logs" / f"{label}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as output:
        started, busy = time.monotonic(), busy_seconds()
        process = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=output, stderr=output)
        _, status, usage = os.wait4(process.pid, 0)
        seconds, busy = time.monotonic() - started, busy_seconds() - busy
    controller = usage.ru_utime + usage.ru_stime
    failed = []
    if (code := os.waitstatus_to_exitcode(status)) != 0:
        # A deploy's summary names each failed machine and why; the run still counts.
        lines = log.read_text(errors="replace").splitlines()
        failed = [line.strip() for line in lines if line.split()[1:2] == ["failed"]]
        failed = failed or [f"exit {code}: {lines[-1] if lines else ''}"]
        print(f"    {label}: {len(failed)} failed (see {log.relative_to(ROOT)})", flush=True)
    after = counters(machines)
    sessions = [after[m.name][0] - before[m.name][0] for m in machines]
    return Run(
        seconds=round(seconds, 2),
        sessions_per_machine=round(sum(sessions) / len(machines), 1),
        logins_per_machine=round(
            sum(after[m.name][3] - before[m.name][3] for m in machines) / len(machines), 1
        ),
        sessions_most=max(sessions),
        commands_per_machine=deploy_commands(records),
        sent_bytes=sum(after[m.name][1] - before[m.name][1] for m in machines),
        received_bytes=sum(after[m.name][2] - before[m.name][2] for m in machines),
        peak_rss_mib=round(usage.ru_maxrss / 1024, 1),
        controller_cpu_seconds=round(controller, 2),
        other_cpu_seconds=round(max(busy - controller, 0.0), 2),
        failed=failed,
    )


def busy_seconds() -> float:
    """CPU seconds this computer has spent busy since it booted, all cores (/proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def fresh_fleet(count: int, latency: float, light: bool) -> list[Machine]:
    testbed("down", "--purge")
    testbed("up", "--machines", str(count), "--latency", f"{latency:g}ms", *(["--light"] * light))
    return load_record(STATE / "machines.json")


def make_flake() -> Path:
    flake = WORK / "example"
    shutil.rmtree(flake, ignore_errors=True)
    shutil.copytree(ROOT / "example", flake, symlinks=True)
    return flake


def set_version(flake: Path, machine: str, version: str) -> None:
    hosts_file = flake / "hosts.json"
    hosts = json.loads(hosts_file.read_text())
    hosts[machine]["version"] = version
    hosts_file.write_text(json.dumps(hosts, indent=2))


def pyinfra(flake: Path, *args: str) -> list[str]:
    return [str(BIN / "pyinfra"), "-y", "--data", f"flake={flake}", "inventory.py", *args]


# -- the floor and the naive loop, as shell scripts -------------------------------------------


def _ssh(machine: Machine) -> str:
    """ssh to the machine as its deploy login, through the test fleet's ssh_config."""
    return f"ssh -F {STATE / 'ssh_config'} {machine.user}@{machine.name}"


def _sources(machine: Machine) -> str:
    """Where a script keeps the flake on the machine: /var/src/config, a login's own home
    when it is not root (a Mac's deploy user with a sudo password; a home-manager login)."""
    return "/var/src/config" if machine.user == "root" else "src/config"


def _nix_copy(machine: Machine, system: str) -> str:
    store = f"ssh://{machine.user}@{machine.name}"
    if machine.klass == "darwin":
        store += f"?remote-program={DARWIN_NIX}/nix-store"
    return f'NIX_SSHOPTS="-F {STATE / "ssh_config"}" {shlex.join(NIX)} copy --to {store!r} {system}'


def _rsync(machine: Machine, flake: Path) -> str:
    directory = _sources(machine)
    return (
        f"{_ssh(machine)} mkdir -p {directory} && "
        f'rsync -a --delete -e "ssh -F {STATE / "ssh_config"}" {flake}/ '
        f"{machine.user}@{machine.name}:{directory}/"
    )


def _switch(machine: Machine, system: str) -> str:
    """Make the machine run `system`, as its own tool would (profile, then activation).
    `system` may be a variable of the local script: the remote command is double-quoted."""
    if machine.klass == "home":
        return f'{_ssh(machine)} "{system}/activate"'  # sets the profile itself (driver 0)
    if machine.klass == "darwin":
        command = (
            f"PATH=\\$PATH:{DARWIN_NIX} nix-env -p /nix/var/nix/profiles/system --set {system}"
            f" && HOME=/var/root {system}/activate"
        )
    else:
        command = (
            f"nix-env -p /nix/var/nix/profiles/system --set {system}"
            f" && {system}/bin/switch-to-configuration switch"
        )
    if machine.user == "root":
        return f'{_ssh(machine)} "{command}"'
    password = STATE / "keys" / "sudo-password"
    return f"{_ssh(machine)} \"sudo -S -p '' sh -c '{command}'\" < {password}"


def systems(flake: Path, machines: list[Machine]) -> dict[str, str]:
    """Each machine's system, built on the controller (one `nix build`)."""
    attributes = [
        f"path:{flake}#" + ATTRIBUTES[m.klass].format(name=m.name, user=m.user) for m in machines
    ]
    built = subprocess.run(
        [*NIX, "build", "--no-link", "--json", *attributes],
        capture_output=True, text=True, check=True, env=ENV,
    )  # fmt: skip
    outputs = [entry["outputs"]["out"] for entry in json.loads(built.stdout)]
    return {m.name: out for m, out in zip(machines, outputs, strict=True)}


def floor_copy(flake: Path, machines: list[Machine], built: dict[str, str]) -> list[str]:
    """rsync of the flake and nix copy of the system to every machine, all at once."""
    jobs = [f"( {_rsync(m, flake)} && {_nix_copy(m, built[m.name])} ) &" for m in machines]
    return ["bash", "-ec", "\n".join([*jobs, "wait"])]


def floor_one_changed(flake: Path, machines: list[Machine], system: str) -> list[str]:
    """The changed flake rsynced to every machine and the new system copied to one, at once."""
    changed = next(m for m in machines if m.name == CHANGED)
    jobs = [f"( {_rsync(m, flake)} ) &" for m in machines] + [f"{_nix_copy(changed, system)} &"]
    return ["bash", "-ec", "\n".join([*jobs, "wait"])]


def naive(flake: Path, machines: list[Machine]) -> list[str]:
    """One machine after the other: rsync the flake, build, copy, switch."""
    steps = []
    for m in machines:
        attribute = f"path:{flake}#" + ATTRIBUTES[m.klass].format(name=m.name, user=m.user)
        steps += [
            _rsync(m, flake),
            f"system=$({shlex.join(NIX)} build --no-link --json {shlex.quote(attribute)}"
            ' | python3 -c \'import json, sys; print(json.load(sys.stdin)[0]["outputs"]["out"])\')',
            _nix_copy(m, "$system"),
            _switch(m, "$system"),
        ]
    return ["bash", "-ec", "\n".join(steps)]


# -- one fleet size at one latency ----------------------------------------------------------


def cell(count: int, latency: float, light: bool) -> dict[str, Run]:
    flake = make_flake()
    runs: dict[str, Run] = {}
    tag = f"{count}m-{latency:g}ms"

    def say(text: str) -> None:
        print(f"  [{time.strftime('%T')}] {tag}: {text}", flush=True)

    say("naive loop, cold")
    machines = fresh_fleet(count, latency, light)
    runs["naive cold"] = measure(f"{tag}-naive-cold", naive(flake, machines), machines)

    say("floor, cold / no-op / one changed")
    machines = fresh_fleet(count, latency, light)
    built = systems(flake, machines)
    runs["floor cold"] = measure(f"{tag}-floor-cold", floor_copy(flake, machines, built), machines)
    runs["floor no-op"] = measure(
        f"{tag}-floor-noop", pyinfra(flake, "exec", "--", "true"), machines
    )
    set_version(flake, CHANGED, "2")
    new = systems(flake, [m for m in machines if m.name == CHANGED])[CHANGED]
    runs["floor one changed"] = measure(
        f"{tag}-floor-changed", floor_one_changed(flake, machines, new), machines
    )
    set_version(flake, CHANGED, "1")

    say("flakefleet, cold / no-op / no-op unchecked / one changed")
    machines = fresh_fleet(count, latency, light)
    deploy = pyinfra(flake, "deploy/site.py")
    runs["flakefleet cold"] = measure(f"{tag}-cold", deploy, machines)
    runs["flakefleet no-op"] = measure(f"{tag}-noop", deploy, machines)
    # The deploy's own part: the no-op with check_unchanged = False checks no machine.
    unchecked = [*deploy, "--data", "check_unchanged=False"]
    runs["flakefleet no-op, no checks"] = measure(f"{tag}-noop-unchecked", unchecked, machines)
    set_version(flake, CHANGED, "2")
    runs["flakefleet one changed"] = measure(f"{tag}-changed", deploy, machines)
    return runs


# -- the report ------------------------------------------------------------------------------


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def cpu(run: Run) -> float:
    return run.controller_cpu_seconds


def report(results: dict[str, dict[str, dict[str, Run]]], sizes: list[int]) -> str:
    lines = []
    largest, smallest = max(sizes), min(sizes)
    lines += [
        "| machines | round trip | no-op / floor | no-op, no checks / floor | cold / naive"
        " | cold / floor | one changed / floor | no-op controller CPU / floor's |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for latency, by_size in results.items():
        for size, runs in by_size.items():
            seconds = {name: run.seconds for name, run in runs.items()}
            unchecked = seconds["flakefleet no-op, no checks"]
            lines.append(
                f"| {size} | {latency} "
                f"| {ratio(seconds['flakefleet no-op'], seconds['floor no-op'])} "
                f"| {ratio(unchecked, seconds['floor no-op'])} "
                f"| {ratio(seconds['flakefleet cold'], seconds['naive cold'])} "
                f"| {ratio(seconds['flakefleet cold'], seconds['floor cold'])} "
                f"| {ratio(seconds['flakefleet one changed'], seconds['floor one changed'])} "
                f"| {ratio(cpu(runs['flakefleet no-op']), cpu(runs['floor no-op']))} |"
            )
    if largest != smallest:
        lines += [
            "",
            f"| round trip | growth {largest}/{smallest} machines: no-op | cold | one changed |",
            "|---:|---:|---:|---:|",
        ]
        for latency, by_size in results.items():
            if str(largest) in by_size and str(smallest) in by_size:  # keyed as in the JSON
                big, small = by_size[str(largest)], by_size[str(smallest)]
                lines.append(
                    f"| {latency} "
                    + "".join(
                        f"| {ratio(big[name].seconds, small[name].seconds)} "
                        for name in (
                            "flakefleet no-op",
                            "flakefleet cold",
                            "flakefleet one changed",
                        )
                    )
                    + "|"
                )
    lines += [
        "",
        "| machines | round trip | run | seconds | SSH sessions per machine (most)"
        " | SSH logins per machine | deploy's SSH commands per machine | KiB sent"
        " | KiB received | peak MiB | controller CPU s | other CPU s |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for latency, by_size in results.items():
        for size, runs in by_size.items():
            for name, run in runs.items():
                failed = f" ({len(run.failed)} failed)" if run.failed else ""
                lines.append(
                    f"| {size} | {latency} | {name}{failed} | {run.seconds:.2f} "
                    f"| {run.sessions_per_machine:g} ({run.sessions_most}) "
                    f"| {run.logins_per_machine:g} "
                    f"| {'' if run.commands_per_machine is None else run.commands_per_machine} "
                    f"| {run.sent_bytes / 1024:.0f} | {run.received_bytes / 1024:.0f} "
                    f"| {run.peak_rss_mib:.0f} | {cpu(run):.2f} | {run.other_cpu_seconds:.2f} |"
                )
    return "\n".join(lines)


def _numbers(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machines", type=_numbers, default=[1, 10, 30], metavar="1,10,30")
    parser.add_argument("--latency", type=_numbers, default=[0, 50], metavar="MS,MS")
    parser.add_argument(
        "--light", action="store_true", help="the roster's copies as namespace machines"
    )
    args = parser.parse_args()

    WORK.mkdir(exist_ok=True)
    RESULTS.mkdir(exist_ok=True)
    output = RESULTS / f"fleet-{time.strftime('%Y%m%d-%H%M%S')}.json"
    when = time.strftime("%Y-%m-%d %H:%M")
    computer = f"{platform.node()}, {os.cpu_count()} cores, {_memory_gib():.0f} GiB"
    started = time.monotonic()
    results: dict[str, dict[str, dict[str, Run]]] = {}
    try:
        for latency in args.latency:
            for count in args.machines:
                cell_runs = cell(count, latency, args.light)
                results.setdefault(f"{latency} ms", {})[str(count)] = cell_runs
                # After each fleet size, so an interrupted run keeps what it measured.
                document = {
                    "date": when,
                    "computer": computer,
                    "minutes": round((time.monotonic() - started) / 60, 1),
                    "light": args.light,
                    "runs": {
                        latency: {
                            size: {name: asdict(run) for name, run in runs.items()}
                            for size, runs in by_size.items()
                        }
                        for latency, by_size in results.items()
                    },
                }
                output.write_text(json.dumps(document, indent=2) + "\n")
    finally:
        testbed("down", "--purge")
    minutes = (time.monotonic() - started) / 60
    print(f"\nflakefleet fleet benchmark, {when}, {computer}, {minutes:.1f} min\n")
    print(report(results, args.machines))
    print(f"\nwritten to {output.relative_to(ROOT)}")
    shutil.rmtree(WORK / "example", ignore_errors=True)


def _memory_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024 / 1024
    return 0.0


if __name__ == "__main__":
    main()
