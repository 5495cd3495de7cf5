"""``python -m testbed``: up, down, status, reboot and ssh for the test fleet.

Exit codes: 0 on success; 1 with one ``testbed: error: ...`` line on stderr otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

from testbed import fleet
from testbed.layout import DEFAULT_ROSTER, StatePaths, TestbedError, state_dir


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """Usage errors follow the one-line, exit-1 convention too."""
        raise TestbedError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m testbed",
        description="Start and stop the local test fleet (namespaces, no VM, no container).",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="start machines (those already running stay as they are)")
    up.add_argument(
        "--machines",
        type=int,
        metavar="N",
        help="the first N roster machines; beyond the roster its machines repeated (web3, db2,"
        " ...; up to 60)",
    )
    up.add_argument(
        "--light",
        action="store_true",
        help="the roster's copies are namespace machines (lighter than systemd machines)",
    )
    up.add_argument(
        "--latency",
        type=_round_trip_ms,
        metavar="TIME",
        help="reach every machine through a relay that adds this round trip (e.g. 50ms; 0ms"
        " relays and counts bytes without delay)",
    )
    up.add_argument("--roster", type=Path, default=DEFAULT_ROSTER, help="hosts.json to read")
    up.add_argument(
        "--systemd",
        type=_names,
        default=[],
        metavar="NAMES",
        help='make these machines (comma-separated) systemd machines, as `"systemd": true`'
        " in the roster does",
    )

    down = commands.add_parser("down", help="stop every machine")
    down.add_argument("--purge", action="store_true", help="also delete the state directory")

    status = commands.add_parser("status", help="one line per machine: name, port, up/down, system")
    status.add_argument("--roster", type=Path, default=DEFAULT_ROSTER, help=argparse.SUPPRESS)

    stop = commands.add_parser("stop", help="power one machine off (`up` starts it again)")
    stop.add_argument("host")

    reboot = commands.add_parser("reboot", help="restart one machine; prints its new boot id")
    reboot.add_argument("host")

    ssh = commands.add_parser("ssh", help="ssh into a machine")
    ssh.add_argument("host")
    ssh.add_argument("remote_command", nargs=argparse.REMAINDER, metavar="CMD")
    return parser


def _names(text: str) -> list[str]:
    return [name for name in text.split(",") if name]


def _round_trip_ms(text: str) -> float:
    """``50ms``, ``0.05s`` or ``50`` (milliseconds) as milliseconds."""
    number, scale = text.strip(), 1.0
    for suffix, factor in (("ms", 1.0), ("s", 1000.0)):
        if number.endswith(suffix):
            number, scale = number.removesuffix(suffix), factor
            break
    try:
        value = float(number) * scale
    except ValueError:
        raise TestbedError(f"--latency {text!r} is not a time like 50ms") from None
    if not 0 <= value <= 10_000:
        raise TestbedError(f"--latency {text!r} must be between 0ms and 10s")
    return value


def _up(args: argparse.Namespace) -> None:
    started = time.monotonic()
    machines = fleet.up(args.roster, args.machines, args.systemd, args.light, args.latency)
    names = ", ".join(machine.name for machine in machines) or "nothing (all running)"
    elapsed = time.monotonic() - started
    print(f"started {names} in {elapsed:.1f} s; fleet file: {StatePaths(state_dir()).fleet_file}")


def _status(args: argparse.Namespace) -> None:
    for entry in fleet.status(args.roster):
        state = "up" if entry.running else "down"
        print(f"{entry.machine.name:<16} {entry.machine.port:<6} {state:<5} {entry.system or '-'}")


def _ssh(args: argparse.Namespace) -> None:
    config = StatePaths(state_dir()).ssh_config
    if not config.exists():
        raise TestbedError(f"{config} does not exist; run `python -m testbed up` first")
    os.execvp("ssh", ["ssh", "-F", str(config), args.host, *args.remote_command])


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        if args.command == "up":
            _up(args)
        elif args.command == "down":
            fleet.down(purge=args.purge)
        elif args.command == "status":
            _status(args)
        elif args.command == "stop":
            fleet.stop(args.host)
        elif args.command == "reboot":
            print(fleet.reboot(args.host))
        elif args.command == "ssh":
            _ssh(args)
    except TestbedError as error:
        print(f"testbed: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # a file of the state directory could not be written or read
        print(f"testbed: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("testbed: error: interrupted", file=sys.stderr)
        return 1
    return 0
