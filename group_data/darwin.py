"""Defaults for nix-darwin machines.

A non-interactive SSH session on macOS has no Nix on its PATH: Nix commands run from the
default profile, where the Nix installer puts them.
"""

remote_nix_dir = "/nix/var/nix/profiles/default/bin"

# The same for pyinfra's own commands (the preflight fact, the lock): its sessions get this
# PATH.
_env = {
    "PATH": ":".join(
        [remote_nix_dir, "/run/current-system/sw/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"]
    )
}
