"""Update the flakes' inputs (their lock files), then show what a deploy would do to each
selected machine with them; commit the new lock file only when asked (seed 000's
`just update`). Changes no machine.

    pyinfra -y inventory.py deploy/update.py [--data update_inputs='["nixpkgs"]']
                                             [--data update_commit=true]

Without `update_commit`, the new lock file stays in the work tree, uncommitted: deploy it as
it is, commit it yourself, or `git checkout flake.lock` to drop it.
"""

from pyinfra import local, state

from flakefleet.run import Run

run = Run.of(state)
run.check_settings(locks_too=False)  # every machine's settings; the lock files come next
run.update_inputs()  # once per flake, before anything is evaluated

local.include("deploy/plan.py")  # checks the new lock files, then plans with them
