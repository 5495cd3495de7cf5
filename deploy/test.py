"""Switch the selected machines to their new systems now, without making them the boot
default (`nixos-rebuild test`): a reboot brings back the previous system.

    pyinfra -y inventory.py deploy/test.py [--limit ...]
"""

from pyinfra import local

local.include("deploy/site.py", data={"goal": "test"})
