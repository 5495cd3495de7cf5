"""Deploy the selected machines and check them: the whole pipeline.

    pyinfra -y inventory.py deploy/site.py [--limit ROLE | --limit CLASS | --limit 'web*']

The goal is `switch` unless the data says otherwise (deploy/boot.py, deploy/test.py, ... set
it). Each step does nothing on a machine that is already where it should be, so a second run
changes nothing.
"""

from pyinfra import host, state

from flakefleet.keys import Upload
from flakefleet.run import Run
from operations import (
    activation,
    closure,
    generations,
    keys,
    preflight,
    reboot,
    recipients,
    rollout,
    sources,
    verify,
)

run = Run.of(state)  # what this run knows; closed once at exit (locks, servers, summary)
run.check_settings()  # every selected machine's settings, before any machine is contacted
settings = run.settings(host.name)
goal = settings.goal
# Secrets, decrypted on the controller; the first call reads every selected machine's, so a
# bad one stops the run before any machine is contacted.
secrets = keys.declared()
# The sources each machine gets; the first call checks every selected machine's.
wanted = sources.declared()
recipients.check()  # a machine whose host key changed must get its secrets re-encrypted first

# Systems, generations, /var/src, keys and whether the deploy lock is free: one round trip
# (the first step with work takes the lock); none for a machine whose class has no such goal
# (nix-darwin and home-manager machines only switch).
machine = preflight.preflight() if activation.supports(goal) else None
target = closure.evaluate(machine) if machine else None  # one Nix evaluation for all machines


def wave(number: int) -> None:
    """This machine's wave of the rollout (`rollout` data; without it, every machine is in one
    wave): its sources and keys, its activation, its checks and confirmation. A later wave
    starts only if the earlier ones did not fail beyond `max_failures`."""
    sources.sync(
        name="Sync the sources to /var/src",
        wanted=wanted,
        var_src=machine.var_src,
    )
    if goal.sets_profile or goal.runs_new_system:  # the keys the new system will read
        keys.upload(
            name="Upload keys (pre-activation)",
            wanted=secrets,
            on_machine=machine.keys,
            stage=Upload.PRE_ACTIVATION,
        )
    activation.activate(
        name=f"Activate ({goal})",
        system=target,
        machine=machine,
        goal=goal,
        confirm_timeout=settings.confirm_timeout,
    )
    if goal.runs_new_system:  # the new system runs: keys for its users, checks, confirm
        keys.upload(
            name="Upload keys (post-activation)",
            wanted=secrets,
            on_machine=machine.keys,
            stage=Upload.POST_ACTIVATION,
        )
        verify.health_gate(name="Health checks", on_failure=settings.on_check_failure)


if target is not None:
    # Every machine's system is built and copied first, together; waves divide activation.
    closure.build(name="Build the system", system=target, machine=machine)
    closure.copy(name="Copy the closure", system=target, machine=machine)
    rollout.in_waves(run.waves(), wave)
    reboot.reboot(
        name="Reboot if needed",
        system=target,
        machine=machine,
        goal=goal,
        policy=settings.reboot,
        timeout=settings.reboot_timeout,
        command=settings.reboot_command,
    )
    keys.restore(name="Upload keys again after a reboot", wanted=secrets)
    generations.prune(
        name="Prune old generations",
        system=target,
        machine=machine,
        goal=goal,
        keep=settings.keep_generations,
    )
    preflight.release(name="Release the deploy lock")  # if a step took it
