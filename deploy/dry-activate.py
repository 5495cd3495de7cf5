"""Show what activating the new systems would change on the selected machines, changing
nothing (`nixos-rebuild dry-activate`): the activation's output is in each machine's log.

    pyinfra -y inventory.py deploy/dry-activate.py [--limit ...]
"""

from pyinfra import local

local.include("deploy/site.py", data={"goal": "dry-activate"})
