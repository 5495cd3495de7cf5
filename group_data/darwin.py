"""Defaults for nix-darwin machines.

A non-interactive SSH session on macOS has no Nix on its PATH: Nix commands run from the
default profile, where the Nix installer puts them.
"""

remote_nix_dir = "/nix/var/nix/profiles/default/bin"

# The same for commands pyinfra runs as the SSH user (commands as root get remote_nix_dir on
# their PATH inside sudo, see flakefleet.sudo.nix_on_path).
_env = {
    "PATH": ":".join(
        [remote_nix_dir, "/run/current-system/sw/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"]
    )
}
