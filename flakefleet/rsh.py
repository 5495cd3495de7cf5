"""rsync's remote shell for machines whose sudo asks for a password.

    rsync --rsh 'python -m flakefleet.rsh FD ssh -p 22 ...' --rsync-path '<Target.rsync_path>'

Starts the ssh command, sends it the password line read from the inherited descriptor FD (a
pipe: the password stays out of every command line), then relays rsync's stream until ssh
exits, and exits as ssh did. A shell pipeline cannot do this: it would wait for its relay,
which waits for rsync, which waits for the pipeline, forever.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from typing import BinaryIO


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[0].isdigit():
        print("usage: python -m flakefleet.rsh FD SSH-COMMAND...", file=sys.stderr)
        return 2
    with os.fdopen(int(argv[0]), "rb") as pipe:
        password_line = pipe.readline()
    ssh = subprocess.Popen(argv[1:], stdin=subprocess.PIPE)
    assert ssh.stdin is not None
    threading.Thread(target=_relay, args=(password_line, ssh.stdin), daemon=True).start()
    return ssh.wait()


def _relay(first: bytes, into: BinaryIO) -> None:
    """Send `first`, then copy standard input to ssh until either side is done."""
    try:
        into.write(first)
        while chunk := os.read(0, 1 << 16):
            into.write(chunk)
            into.flush()
        into.close()
    except OSError:  # ssh is gone; its exit status says why
        pass


if __name__ == "__main__":
    # Exit at once, as ssh did: the relay may still wait on rsync, which waits for us.
    os._exit(main(sys.argv[1:]))
