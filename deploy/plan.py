"""Show what a deploy would do to each selected machine, and how each drifted from where the
last deploy left it, without changing any machine.

    pyinfra -y inventory.py deploy/plan.py [--limit ...]

Each machine costs one round trip, as its SSH user (no sudo, no lock); systems built on the
controller are built, so their package changes, closure size and reboot can be told. Sources
are compared by digest: no pipe command and no source build runs.
"""

from pyinfra import state

from flakefleet.run import Run
from operations import closure, plan, sources

Run.of(state).check_settings()  # every selected machine's settings, before any is contacted

machine = plan.read_state()  # systems and generations: one round trip
target = closure.evaluate(machine)  # one Nix evaluation for all machines

if target is not None:
    plan.show(name="Plan", system=target, machine=machine, wanted=sources.declared(commands=False))
