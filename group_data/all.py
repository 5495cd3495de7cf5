"""Defaults for every machine.

Override them per group (`group_data/<role or class>.py`), per machine (`data:` in the fleet
file) or per run (`pyinfra inventory.py deploy/site.py --data goal=boot`).
"""

# The flake that describes the fleet: a local directory, relative to the repository root.
# It must have nixosConfigurations.<machine> for every NixOS machine.
flake = "example"

# What to do with the new system: switch, boot, test, dry-activate, or build (build and copy only).
goal = "switch"

# Extra Nix settings for the controller's Nix commands, as `--option NAME VALUE`
# (the test fleet sets `substituters: ""` because this machine is offline).
nix_options: dict[str, str] = {}
