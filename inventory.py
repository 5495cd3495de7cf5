"""The fleet as a pyinfra inventory: one group per machine class and per role.

Reads `fleet.yaml` in the directory pyinfra runs in, or the file named by FLAKEFLEET_FLEET
(the test fleet's is `.testbed/fleet.yaml`). A bad fleet file stops here, before any machine
is contacted.
"""

import sys
from pathlib import Path

from flakefleet.fleet import FleetError, fleet_file, limit_problems, limits, load_fleet

try:
    _fleet = load_fleet(fleet_file())
except FleetError as _error:
    raise SystemExit(f"flakefleet: {_error}") from None

# A --limit that selects nothing is a mistake to stop on, before any machine is contacted.
if Path(sys.argv[0]).name == "pyinfra":
    _problems = limit_problems(_fleet, limits(sys.argv[1:]))
    if _problems:
        raise SystemExit("\n".join(f"flakefleet: {_problem}" for _problem in _problems))

_groups: dict[str, list[tuple[str, dict]]] = {}
for _machine in _fleet.machines:
    for _group in _machine.groups:
        _host_data = _fleet.host_data(_machine, Path(__file__).resolve().parent)
        _groups.setdefault(_group, []).append((_machine.name, _host_data))

# pyinfra makes a group of every public module-level list.
globals().update(_groups)
