"""Deploy the selected machines and check them: the whole pipeline.

    pyinfra -y inventory.py deploy/site.py [--limit ROLE | --limit CLASS | --limit 'web*']

Each step does nothing on a machine that is already where it should be, so a second run
changes nothing.
"""

from pyinfra import host, state

from facts.machine import Machine
from flakefleet import report
from operations import activation, closure, sources, verify

report.install(state)
goal = host.data.get("goal", "switch")

machine = host.get_fact(Machine)  # preflight: systems, generations and /var/src in one round trip
target = closure.evaluate(machine)  # one Nix evaluation for every selected machine

if target is not None:
    sources.tree(
        name="Sync the flake to /var/src/config",
        source="config",
        path=host.data.get("flake"),
        var_src=machine.var_src,
    )
    closure.build(name="Build the system", system=target, machine=machine)
    closure.copy(name="Copy the closure", system=target, machine=machine)
    activation.activate(name=f"Activate ({goal})", system=target, machine=machine, goal=goal)
    if goal in ("switch", "test"):
        verify.smoke_checks(name="Smoke checks")
