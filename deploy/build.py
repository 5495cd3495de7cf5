"""Build the selected machines' systems and copy them to the machines, activating nothing
(colmena's `push`).

    pyinfra -y inventory.py deploy/build.py [--limit ...]
"""

from pyinfra import local

local.include("deploy/site.py", data={"goal": "build"})
