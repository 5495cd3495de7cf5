"""Show where each selected machine stands: what it runs and since when, from which revision
and by whom, whether the flake would change it, a pending reboot, failed units. Changes no
machine and takes no lock.

    pyinfra -y inventory.py deploy/status.py [--limit ...]

One round trip per machine (as root, through sudo where its SSH user is not root: its deploy
history is root's only); unreachable machines get a row saying so. With FLAKEFLEET_REPORT set,
each machine's row is in that JSON file too (`state`).
"""

from pyinfra import state

from flakefleet.run import Run
from operations import closure, status

Run.of(state).check_settings()  # every selected machine's settings, before any is contacted

standing = status.read()  # snapshot, deploy history, failed units: one round trip
target = closure.evaluate(standing.machine) if standing else None  # one evaluation for all

if target is not None:
    status.show(name="Status", system=target, standing=standing)
