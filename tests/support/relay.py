"""A delaying TCP relay: round-trip time between stages on one machine, without netem.

`Relay` listens on a kernel-chosen loopback port and forwards every connection to a
target address. Each direction holds what it reads for a fixed one-way delay (half the
round-trip time) before writing it on: a chunk is stamped when it is read and released at
that stamp plus the delay, in the order it was read. Reading never waits on writing (the
chunks queue), so the relay adds latency, not a rate limit: a stream of chunks read 1 ms
apart leaves 1 ms apart, one delay later. Put one in front of each stage (pipeline.json's
stage address points at the relay, the relay at the stage's own port) and every hop,
the return hop to stage 0 included, takes the one-way delay.

The relay runs its own event loop on a daemon thread, so blocking callers (the
benchmarks, tests) can use it; `delay` may be changed between requests. Accuracy: the
release is an event-loop timer (about a millisecond's resolution, later when the machine
is busy), so the delay is a lower bound plus scheduling lateness; `ping_pong` measures
it (docs/benchmarks.md gives figures).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import statistics
import threading
import time
from collections.abc import Iterator


class Relay:
    def __init__(self, target: tuple[str, int], *, one_way_ms: float = 0.0) -> None:
        self.target = target
        self.delay = one_way_ms / 1000.0
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Relay:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, "127.0.0.1", 0), self.loop
        ).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        self.loop.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError:
                writer.close()
                return
            await asyncio.gather(
                self._pump(reader, up_writer),
                self._pump(up_reader, writer),
                return_exceptions=True,
            )
        except asyncio.CancelledError:
            # stop(): end quietly (asyncio's server callback would report the cancellation)
            writer.close()
        finally:
            self._tasks.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy reader to writer, each chunk released at its read time plus the delay."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def release() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    return
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(release())
        try:
            while True:
                data = await reader.read(1 << 16)
                queue.put_nowait((time.monotonic() + self.delay, data))
                if not data:  # end of stream: forwarded after what came before it
                    break
            await sender
            with contextlib.suppress(OSError):
                if writer.can_write_eof():
                    writer.write_eof()
        except (OSError, asyncio.CancelledError):
            sender.cancel()
            writer.close()
            raise
        finally:
            if sender.done() and not sender.cancelled() and sender.exception() is not None:
                writer.close()


@contextlib.contextmanager
def relays(targets: list[tuple[str, int]], *, one_way_ms: float = 0.0) -> Iterator[list[Relay]]:
    """One started relay per target, stopped on exit."""
    started: list[Relay] = []
    try:
        for target in targets:
            started.append(Relay(target, one_way_ms=one_way_ms).start())
        yield started
    finally:
        for relay in started:
            relay.stop()


@contextlib.contextmanager
def echo_server() -> Iterator[tuple[str, int]]:
    """A thread that echoes every connection's bytes back, on a kernel-chosen port."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    done = threading.Event()

    def serve_one(conn: socket.socket) -> None:
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while data := conn.recv(1 << 16):
                conn.sendall(data)

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[:2]
    finally:
        done.set()
        thread.join(5)
        listener.close()


def ping_pong(rtt_ms: float, rounds: int = 200, size: int = 64) -> list[float]:
    """Seconds per round trip of `size` bytes through a relay of `rtt_ms` in front of an
    echo server (each round trip crosses the relay once each way)."""
    seconds: list[float] = []
    with (
        echo_server() as target,
        relays([target], one_way_ms=rtt_ms / 2) as (relay,),
        socket.create_connection(("127.0.0.1", relay.port), timeout=30) as conn,
    ):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        message = b"x" * size
        for _ in range(rounds):
            started = time.perf_counter()
            conn.sendall(message)
            got = 0
            while got < size:
                chunk = conn.recv(size - got)
                if not chunk:
                    raise ConnectionError("relay closed the connection")
                got += len(chunk)
            seconds.append(time.perf_counter() - started)
    return seconds


def summary(seconds: list[float]) -> tuple[float, float, float]:
    """(median, p90, max) in milliseconds."""
    ordered = sorted(seconds)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return statistics.median(ordered) * 1000, p90 * 1000, ordered[-1] * 1000
