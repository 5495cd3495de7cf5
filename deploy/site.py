"""Deploy the selected machines and check them: the whole pipeline.

    pyinfra -y inventory.py deploy/site.py [--limit ROLE | --limit CLASS | --limit 'web*']

The goal is `switch` unless the data says otherwise (deploy/boot.py, deploy/test.py, ... set
it). Each step does nothing on a machine that is already where it should be, so a second run
changes nothing.
"""

from pyinfra import host, state

from flakefleet import report, settings
from operations import activation, closure, generations, lock, reboot, sources, verify

report.install(state)
settings.check()  # every selected machine's settings, before any machine is contacted
goal = host.data.get("goal", "switch")

# The deploy lock, systems, generations and /var/src: one round trip; none for a machine
# whose class has no such goal (nix-darwin and home-manager machines only switch).
machine = lock.preflight() if activation.supports(goal) else None
target = closure.evaluate(machine) if machine else None  # one Nix evaluation for all machines

if target is not None:
    sources.sync(
        name="Sync the sources to /var/src",
        wanted=sources.declared(),  # the first call checks every selected machine's sources
        var_src=machine.var_src,
    )
    closure.build(name="Build the system", system=target, machine=machine)
    closure.copy(name="Copy the closure", system=target, machine=machine)
    activation.activate(
        name=f"Activate ({goal})",
        system=target,
        machine=machine,
        goal=goal,
        confirm_timeout=host.data.get("confirm_timeout", 30),
    )
    if goal in ("switch", "test"):  # the new system runs: check it, then confirm or roll back
        verify.health_gate(name="Health checks", on_failure=host.data.get("on_check_failure"))
    reboot.reboot(
        name="Reboot if needed",
        system=target,
        goal=goal,
        policy=host.data.get("reboot", "never"),
        timeout=host.data.get("reboot_timeout", 300),
    )
    generations.prune(
        name="Prune old generations",
        system=target,
        machine=machine,
        goal=goal,
        keep=host.data.get("keep_generations"),
    )
    lock.release(name="Release the deploy lock")
