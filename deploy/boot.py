"""Make the new systems what the selected machines boot next, without switching now
(`nixos-rebuild boot`). With `--data reboot=when-needed` (or `always`) they reboot into it.

    pyinfra -y inventory.py deploy/boot.py [--limit ...]
"""

from pyinfra import local

local.include("deploy/site.py", data={"goal": "boot"})
