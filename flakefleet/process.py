"""The one place the controller starts local processes (nix, rsync, ssh, pytest)."""

from __future__ import annotations

import contextlib
import os
import select
import shlex
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence


class CommandError(RuntimeError):
    """A local command that failed; the message ends with the last lines it printed."""

    def __init__(self, argv: Sequence[str], returncode: int, output: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.output = output
        tail = " | ".join(line.strip() for line in output.strip().splitlines()[-3:])
        super().__init__(f"{argv[0]} exited {returncode}: {tail or '(no output)'}")


def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    stdin: str | None = None,
    cwd: str | None = None,
    check: bool = True,
    timeout: float | None = None,
    pass_fds: Sequence[int] = (),
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion, capturing its output; `env` adds to the current environment.

    Without `stdin`, it reads nothing (never the deployer's terminal). `pass_fds` are open
    descriptors it inherits. Raises subprocess.TimeoutExpired (after killing the command) when
    `timeout` passes.
    """
    completed = subprocess.run(
        list(argv),
        **({"stdin": subprocess.DEVNULL} if stdin is None else {"input": stdin}),
        pass_fds=pass_fds,
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **env} if env else None,
        check=False,
        timeout=timeout,
    )
    if check and completed.returncode != 0:
        raise CommandError(argv, completed.returncode, completed.stderr or completed.stdout)
    return completed


def run_fed(
    argv: Callable[[int], Sequence[str]],
    feed: Callable[[], bytes],
    *,
    cwd: str | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command that reads `feed()` from a pipe, started before `feed` is called, so that it
    starts up while its input is made; `argv(descriptor)` names the pipe's descriptor to it.

    A command that ends without reading it all is no error (its output says why). Raises
    subprocess.TimeoutExpired (after killing the command) when `timeout` passes.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    read, write = os.pipe()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            command = list(argv(read))
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=err, cwd=cwd, pass_fds=(read,))  # fmt: skip
        except BaseException:
            os.close(write)
            raise
        finally:
            os.close(read)  # the command's copy is its own: a command gone breaks the pipe
        try:
            try:
                with contextlib.suppress(BrokenPipeError):
                    _write_all(write, feed(), deadline)
            finally:
                os.close(write)  # the end of its input
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            returncode = process.wait(remaining)
        except BaseException:
            process.kill()
            process.wait()
            raise
        out.seek(0)
        err.seek(0)
        stdout, stderr = (f.read().decode(errors="replace") for f in (out, err))
    return subprocess.CompletedProcess(command, returncode, stdout, stderr)


def _write_all(descriptor: int, data: bytes, deadline: float | None) -> None:
    """Write `data` to a pipe without blocking the process while the reader is not reading
    (`select` yields to the run's other tasks under gevent)."""
    os.set_blocking(descriptor, False)
    view = memoryview(data)
    while view:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise subprocess.TimeoutExpired("(pipe)", 0)
        _, ready, _ = select.select([], [descriptor], [], remaining)
        if ready:
            with contextlib.suppress(BlockingIOError):
                view = view[os.write(descriptor, view) :]


def describe(argv: Sequence[str]) -> str:
    """A command line as a user would type it, for logs."""
    return shlex.join(argv)


def start(argv: Sequence[str], *, log: str, cwd: str | None = None) -> subprocess.Popen[bytes]:
    """Start a long-running helper (e.g. a cache's HTTP server) that the caller stops by PID.

    Its output goes to `log`. It gets SIGTERM if the controller dies first, so a crashed or
    killed deploy never leaves it running.
    """
    with open(log, "ab") as output:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            preexec_fn=_die_with_parent,
        )


def stop(process: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """Stop a helper started by `start`: SIGTERM, then SIGKILL if it lingers."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _die_with_parent() -> None:
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
