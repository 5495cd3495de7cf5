"""The fleet as a pyinfra inventory: one group per machine class and per role.

Reads `fleet.yaml` beside this file, or the file named by FLAKEFLEET_FLEET (the test fleet's
is `.testbed/fleet.yaml`). A bad fleet file stops here, before any machine is contacted.
"""

import os
from pathlib import Path

from flakefleet.fleet import FleetError, load_fleet

_path = Path(os.environ.get("FLAKEFLEET_FLEET") or Path(__file__).parent / "fleet.yaml")
try:
    _fleet = load_fleet(_path)
except FleetError as _error:
    raise SystemExit(f"flakefleet: {_error}") from None

_groups: dict[str, list[tuple[str, dict]]] = {}
for _machine in _fleet.machines:
    for _group in _machine.groups:
        _groups.setdefault(_group, []).append((_machine.name, _fleet.host_data(_machine)))

# pyinfra makes a group of every public module-level list.
globals().update(_groups)
