"""Move the selected machines back one generation, or to a named one, and activate it
(`nixos-rebuild switch --rollback`), with the health checks and automatic rollback of a deploy.

    pyinfra -y inventory.py deploy/rollback.py --limit web1 [--data generation=41]
"""

from pyinfra import host, state

from flakefleet import report
from operations import activation, lock, verify

report.install(state)

machine = lock.preflight()
if machine is not None:
    activation.roll_back(
        name="Roll back",
        machine=machine,
        generation=host.data.get("generation"),
        confirm_timeout=host.data.get("confirm_timeout", 30),
    )
    verify.health_gate(name="Health checks", on_failure=host.data.get("on_check_failure"))
    lock.release(name="Release the deploy lock")
