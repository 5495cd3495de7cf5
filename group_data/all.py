"""Defaults for every machine.

Override them per group (`group_data/<role or class>.py`), per machine (`data:` in the fleet
file) or per run (`pyinfra inventory.py deploy/site.py --data goal=boot`).
"""

# The flake that describes the fleet: a local directory, relative to the repository root.
# It must have nixosConfigurations.<machine> for every NixOS machine.
flake = "example"

# The goal (switch, boot, test, dry-activate, build) comes from the deploy file you run:
# deploy/site.py and deploy/switch.py switch, deploy/boot.py boots, and so on.

# Seconds a switched machine waits for the deployer's confirmation, made over a new SSH
# connection after the health checks pass, before it rolls itself back (0: no confirmation).
confirm_timeout = 30

# What a failed health check does to a machine just activated: rollback, keep, or stop (roll
# back and activate no further machine in this run).
on_check_failure = "rollback"

# Declared health checks besides tests/smoke/, e.g.
#   checks = [{"command": "systemctl is-active nginx", "timeout": 10},
#             {"http": "https://web1.example.org/health", "status": 200, "timeout": 5}]
checks: list[dict] = []

# Reboot after activating: never, when-needed (kernel, initrd or modules changed, or a boot
# goal), or always; the machine must come back on the new system within reboot_timeout seconds.
reboot = "never"
reboot_timeout = 300
reboot_command = "reboot"

# Extra Nix settings for the controller's Nix commands, as `--option NAME VALUE`
# (the test fleet sets `substituters: ""` because this machine is offline).
nix_options: dict[str, str] = {}
