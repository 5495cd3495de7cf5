"""Switch the selected machines to their new systems now and make them the boot default
(`nixos-rebuild switch`), with the health checks. The same as deploy/site.py.

    pyinfra -y inventory.py deploy/switch.py [--limit ...]
"""

from pyinfra import local

local.include("deploy/site.py", data={"goal": "switch"})
