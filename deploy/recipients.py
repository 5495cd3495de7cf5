"""Bring the fleet's secrets up to date with its machines' host keys (agenix, sops-nix).

    pyinfra -y inventory.py deploy/recipients.py

Writes each machine's SSH host key, as the fleet's known hosts hold it, into the recipients
file (`recipients_file`); re-encrypts each age file of the rules (`secrets_rules`) whose
recipients are not its machines' and the admins' (files already right stay byte for byte);
writes a .sops.yaml creation rule per machine and role (`sops_config`). No machine is changed.
"""

from pyinfra import host, state

from flakefleet.recipients import RecipientError
from flakefleet.run import Run
from operations import recipients

run = Run.of(state)
run.check_settings()
try:
    changes = recipients.update()
except RecipientError as error:
    run.stop([str(error)], {}, f"recipients: {error}")
with run.lock:
    if not run.finished:  # print once per run
        print("--> flakefleet recipients")
        for line in changes or ["up to date"]:
            print(f"    {line}")
    run.finished.add(host.name)
