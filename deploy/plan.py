"""Show what a deploy would do to each selected machine, and how each drifted from where the
last deploy left it, without changing any machine.

    pyinfra -y inventory.py deploy/plan.py [--limit ...]

Each machine costs one round trip, as root (through sudo where its SSH user is not root, asked
for as a deploy asks), with no lock; systems built on the controller are built, so their
package changes, closure size and reboot can be told. Sources and keys are compared by digest:
no pipe command, key command, generator or source build runs.
"""

from pyinfra import state

from flakefleet.run import Run
from operations import closure, keys, plan, sources

Run.of(state).check_settings()  # every selected machine's settings, before any is contacted

wanted_keys = keys.declared(planning=True)  # on the controller, before any machine is read
planned = plan.read_state()  # state, keys, dry-activate: one round trip, after one evaluation
target = closure.evaluate(planned.machine) if planned else None

if target is not None and planned is not None:
    plan.show(
        name="Plan",
        system=target,
        planned=planned,
        wanted=sources.declared(commands=False),
        keys=wanted_keys,
    )
