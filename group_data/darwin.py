"""Defaults for nix-darwin machines.

A non-interactive SSH session on macOS has no Nix on its PATH: Nix commands run from the
default profile, where the Nix installer puts them.
"""

# Every command flakefleet runs there has it first on PATH (flakefleet.target.Target).
remote_nix_dir = "/nix/var/nix/profiles/default/bin"
