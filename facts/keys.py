"""Facts about the keys a machine holds (`flakefleet.keys`): what its manifest lists."""

from __future__ import annotations

from pyinfra.api import FactBase

from flakefleet import keys
from flakefleet.models import KeyOnMachine


class Keys(FactBase[dict[str, KeyOnMachine]]):
    """The keys flakefleet uploaded, by name: each one's keyed digest (never its content),
    destination, and the file's permissions, owner and group now (as root; the manifest is
    root's alone).

    Example output::

        db-password 5e1f...c2 -r-------- postgres postgres /run/keys/db-password
        wg-private 9a0b...17 - - - /run/keys/wg-private
    """

    @staticmethod
    def default() -> dict[str, KeyOnMachine]:
        return {}

    def command(self) -> str:
        return keys.manifest_script()

    def process(self, output: list[str]) -> dict[str, KeyOnMachine]:
        return keys.parse_manifest(output)
