"""Closure fan-out through a binary cache: the controller uploads each store path once, then
every machine fetches its closure from the cache in parallel.

`cache` in the data (per machine or group) says where::

    cache = {"store": "file://.flakefleet/cache",   # where the controller uploads
             "url": "http://10.0.0.5:8370",          # where machines fetch from (default: store)
             "serve": True}                          # serve the file:// store at url for the run
    cache = {"machine": "build1"}   # a fleet machine's own store: uploaded to once, over ssh-ng,
                                    # and it sends each machine its closure

A served cache is a `python3 -m http.server` the controller starts on first use and stops by
PID once every machine fetched from it (and when the run closes, whatever happened).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flakefleet import process

READY_TIMEOUT = 10.0


class CacheError(ValueError):
    """A `cache` setting that cannot be used; the message names the setting."""


@dataclass(frozen=True)
class Cache:
    """Where closures go once, and where machines fetch them from."""

    store: str = ""  # the Nix store URL the controller uploads to
    url: str = ""  # the URL machines fetch from
    serve: bool = False  # serve the file:// store over HTTP at url while the run needs it
    machine: str = ""  # or: a fleet machine whose store is the cache

    @property
    def directory(self) -> Path:
        """The local directory of a file:// store."""
        return Path(urlsplit(self.store).path)


def parse(value: Any, cwd: Path, machines: Collection[str]) -> Cache | None:
    """Check a `cache` setting; relative file:// paths are relative to `cwd`.

    Example: ``parse({"store": "file://c", "url": "http://127.0.0.1:8370", "serve": True},
    Path("/repo"), []) == Cache("file:///repo/c", "http://127.0.0.1:8370", True)``.
    """
    if not value:
        return None
    if not isinstance(value, Mapping):
        raise CacheError(f"cache: expected a mapping, not {value!r}")
    unknown = set(value) - {"store", "url", "serve", "machine"}
    if unknown:
        raise CacheError(
            f"cache: unknown field {sorted(unknown)[0]!r} (store, url, serve, machine)"
        )
    if value.get("machine"):
        if value["machine"] not in machines:
            raise CacheError(f"cache: machine {value['machine']!r} is not in the fleet")
        return Cache(machine=str(value["machine"]))
    store = str(value.get("store") or "")
    if not store:
        raise CacheError("cache: needs a store (a Nix store URL) or a machine")
    if store.startswith("file://"):  # relative to the repository; keep the query (compression=)
        path, mark, query = store.removeprefix("file://").partition("?")
        store = "file://" + str((cwd / path).resolve()) + mark + query
    url = str(value.get("url") or store)
    serve = bool(value.get("serve", False))
    if serve and not (store.startswith("file://") and url.startswith("http://")):
        raise CacheError("cache: serve needs a file:// store and an http:// url")
    if serve and not urlsplit(url).port:
        raise CacheError(f"cache: url {url!r} needs a port to serve on")
    return Cache(store=store, url=url, serve=serve)


class Server:
    """The HTTP server of one served cache, shared by every machine that fetches from it."""

    def __init__(self, cache: Cache) -> None:
        self.cache = cache
        self.users = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def acquire(self) -> None:
        """Make sure the server answers, for one more machine."""
        with self._lock:
            self.users += 1
            if self._process is None or self._process.poll() is not None:
                self._process = _serve(self.cache)

    def release(self) -> None:
        """One machine is done with the cache; the last one stops the server."""
        with self._lock:
            self.users -= 1
            if self.users <= 0:
                self.stop()

    def stop(self) -> None:
        if self._process is not None:
            process.stop(self._process)
            self._process = None


def _serve(cache: Cache) -> subprocess.Popen[bytes]:
    address = urlsplit(cache.url)
    host, port = address.hostname or "127.0.0.1", address.port or 80
    if _answers(host, port):
        raise CacheError(f"cache: {host}:{port} is already in use; choose another url")
    server = process.start(
        [sys.executable, "-m", "http.server", "--bind", host, "--directory",
         str(cache.directory), str(port)],
        log=str(cache.directory.parent / f"{cache.directory.name}-http.log"),
    )  # fmt: skip
    deadline = time.monotonic() + READY_TIMEOUT
    while not _answers(host, port):
        if server.poll() is not None or time.monotonic() > deadline:
            process.stop(server)
            raise CacheError(f"cache: the HTTP server on {host}:{port} did not start")
        time.sleep(0.05)
    return server


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False
