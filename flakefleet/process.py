"""The one place the controller starts local processes (nix, rsync, ssh, pytest)."""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence


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
