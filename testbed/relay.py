"""A machine's relay: a loopback TCP relay in front of its sshd that delays every byte.

    python -m testbed.relay NAME STATE ADDRESS PORT ROUND_TRIP_MS

listens on ``ADDRESS:PORT`` (the machine's own loopback address, see ``Machine.address``) and
relays each connection to its sshd on ``127.0.0.1:PORT``. Each direction's bytes are held for
half the round trip before they are passed on, in order and without limiting the bandwidth, so
a request and its answer take at least ``ROUND_TRIP_MS``; a new connection first waits one
round trip (TCP's own handshake, which the kernel completes at once on loopback). The shared
loopback itself is never slowed down.

It also counts what passes: ``machines/NAME/relay-bytes`` holds ``SENT RECEIVED OPEN`` (bytes
from the clients to the machine, bytes back, connections open), rewritten whenever a connection
opens or closes, so a benchmark reads what a run sent once ``OPEN`` is back to 0.
``python -m testbed up --latency 50ms`` starts one per machine; ``down`` stops it (SIGTERM).

Standard library only, like the rest of what runs beside the machines.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

from testbed.layout import StatePaths

CHUNK = 1 << 16


class Counts:
    """Bytes each way and open connections, written to the counts file on every change of
    ``open`` (the bytes of a connection are all counted by the time it closes)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sent = self.received = self.open = 0
        self.write()

    def write(self) -> None:
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(f"{self.sent} {self.received} {self.open}\n")
        os.replace(temporary, self.path)


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float, count: list[int]
) -> None:
    """Pass ``reader``'s bytes to ``writer`` ``delay`` seconds after each arrived."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def receive() -> None:
        try:
            while data := await reader.read(CHUNK):
                count[0] += len(data)
                queue.put_nowait((loop.time() + delay, data))
        except OSError:
            pass  # reset: the end of the stream all the same
        finally:
            queue.put_nowait((loop.time() + delay, b""))  # end of stream, delayed as well

    receiving = asyncio.create_task(receive())
    try:
        while True:
            due, data = await queue.get()
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                break
            try:
                writer.write(data)
                await writer.drain()
            except OSError:
                break  # the other side is gone; its own reader ends the other direction
    finally:
        receiving.cancel()


async def _serve(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    port: int,
    delay: float,
    counts: Counts,
) -> None:
    counts.open += 1
    counts.write()
    sent, received = [0], [0]
    try:
        await asyncio.sleep(2 * delay)  # the handshake's round trip
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            await asyncio.gather(
                _pipe(client_reader, server_writer, delay, sent),
                _pipe(server_reader, client_writer, delay, received),
                return_exceptions=True,
            )
        finally:
            server_writer.close()
    except OSError:
        pass  # the machine is down or reset the connection: the client sees it closed
    finally:
        client_writer.close()
        counts.sent += sent[0]
        counts.received += received[0]
        counts.open -= 1
        counts.write()


async def relay(address: str, port: int, round_trip_ms: float, counts: Counts) -> None:
    delay = round_trip_ms / 2000

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _serve(reader, writer, port, delay, counts)

    server = await asyncio.start_server(serve, address, port, reuse_address=True)
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    async with server:
        await stopped.wait()


def main(argv: list[str]) -> int:
    if len(argv) != 5:
        print(__doc__.splitlines()[2].strip(), file=sys.stderr)
        return 2
    name, state, address, port, round_trip_ms = argv
    counts = Counts(StatePaths(Path(state)).machine(name).relay_bytes)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(relay(address, int(port), float(round_trip_ms), counts))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
