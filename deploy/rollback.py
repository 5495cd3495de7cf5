"""Move the selected machines back one generation, or to a named one, and activate it
(`nixos-rebuild switch --rollback`), with the health checks and automatic rollback of a deploy.

    pyinfra -y inventory.py deploy/rollback.py --limit web1 [--data generation=41]
"""

from pyinfra import host, state

from flakefleet.run import Run
from operations import activation, preflight, verify

run = Run.of(state)
run.check_settings()
settings = run.settings(host.name)

machine = preflight.preflight()
if machine is not None:
    activation.roll_back(
        name="Roll back",
        machine=machine,
        generation=settings.generation,
        confirm_timeout=settings.confirm_timeout,
    )
    verify.health_gate(name="Health checks", on_failure=settings.on_check_failure)
    preflight.release(name="Release the deploy lock")
