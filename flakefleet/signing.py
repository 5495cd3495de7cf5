"""The fleet's Nix signing key: closures are signed with it before they leave the controller,
and machines list its public half in `trusted-public-keys`, so no copy needs --no-check-sigs.

The key is made with `nix key generate-secret` on first use (default
`.flakefleet/keys/signing.sec`, git-ignored; `signing_key` in the data names another file).
Copying unsigned is an explicit choice: `sign_closures = False`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path

from flakefleet.nix import FEATURES, NixError
from flakefleet.process import CommandError, run

DEFAULT_KEY = ".flakefleet/keys/signing.sec"


def key_for(signing_key: str, sign_closures: bool, cwd: Path) -> Path | None:
    """The secret key a machine's closures are signed with, made if missing; None when the
    settings say to copy unsigned (`sign_closures = False`)."""
    if not sign_closures:
        return None
    path = cwd / signing_key
    if not path.exists():
        # Another machine's copy may make it first: use that one.
        with contextlib.suppress(FileExistsError):
            generate(path, f"flakefleet-{socket.gethostname()}-1")
    return path


def generate(path: Path, name: str) -> str:
    """Make a key pair: the secret at `path` (mode 600), the public half at `path`.pub.

    Returns the public key, e.g. ``flakefleet-laptop-1:Qa2i/KmC51u...=``.
    """
    try:
        secret = run(["nix", *FEATURES, "key", "generate-secret", "--key-name", name]).stdout
        public = run(["nix", *FEATURES, "key", "convert-secret-to-public"], stdin=secret).stdout
    except CommandError as error:
        raise NixError(f"cannot make a signing key: {error}") from error
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written aside, then linked into place: a key is never seen half written, and of two
    # deploys making one at once, the second gets FileExistsError and uses the first's.
    partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w") as stream:
            stream.write(secret)
        os.link(partial, path)
    finally:
        partial.unlink()
    public_path(path).write_text(public.strip() + "\n")
    return public.strip()


def public_path(key: Path) -> Path:
    return key.with_name(key.name + ".pub")


def public_key(key: Path) -> str:
    """The public half of a secret key (from its .pub file, else computed)."""
    if public_path(key).exists():
        return public_path(key).read_text().strip()
    try:
        secret = key.read_text()
        return run(
            ["nix", *FEATURES, "key", "convert-secret-to-public"], stdin=secret
        ).stdout.strip()
    except CommandError as error:
        raise NixError(f"cannot read the signing key {key}: {error}") from error
