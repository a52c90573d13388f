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

`RelayProcess` is the same relay as a process of its own (`python -m tests.support.relay
serve`), so it can run inside an emulated node's network namespace
(tests/support/emulated.py) in front of a stage there: a hop into the node then crosses
the `tc tbf`-shaped veth (rate) and the relay (delay), both per hop. `echo_process` and
`ping_from` run the echo server and the ping-pong client the same way, to measure it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path


class Relay:
    def __init__(
        self, target: tuple[str, int], *, one_way_ms: float = 0.0, host: str = "127.0.0.1"
    ) -> None:
        self.target = target
        self.host = host
        self.delay = one_way_ms / 1000.0
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> Relay:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, self.host, 0), self.loop
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
def echo_server(host: str = "127.0.0.1") -> Iterator[tuple[str, int]]:
    """A thread that echoes every connection's bytes back, on a kernel-chosen port."""
    listener = socket.create_server((host, 0))
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
    with (
        echo_server() as target,
        relays([target], one_way_ms=rtt_ms / 2) as (relay,),
    ):
        return ping(("127.0.0.1", relay.port), rounds=rounds, size=size)


def ping(address: tuple[str, int], *, rounds: int, size: int = 64) -> list[float]:
    """Seconds per round trip of `size` bytes to an echo server at `address` (one
    connection, one message in flight)."""
    seconds: list[float] = []
    with socket.create_connection(address, timeout=30) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        message = b"x" * size
        for _ in range(rounds):
            started = time.perf_counter()
            conn.sendall(message)
            got = 0
            while got < size:
                chunk = conn.recv(size - got)
                if not chunk:
                    raise ConnectionError("the connection closed mid round trip")
                got += len(chunk)
            seconds.append(time.perf_counter() - started)
    return seconds


class RelayProcess:
    """A relay in a process of its own, started by `prefix` (e.g. `ip netns exec NS`):
    inside an emulated node's network namespace, in front of a stage listening there, a
    hop into the node first crosses the node's `tc tbf`-shaped veth and then the delay, so
    rate limit and round-trip time hold per hop together. Same `address`, `delay` and
    `stop` as `Relay`; setting `delay` sends the new one-way delay on the process's stdin
    and waits for it to be in force."""

    def __init__(
        self,
        target: tuple[str, int],
        *,
        host: str,
        one_way_ms: float = 0.0,
        prefix: Sequence[str] = (),
    ) -> None:
        self.host = host
        self._delay = one_way_ms / 1000.0
        self.process = _spawn(
            prefix,
            "serve",
            "--host",
            host,
            "--target",
            f"{target[0]}:{target[1]}",
            "--one-way-ms",
            str(one_way_ms),
        )
        self.port = int(_expect(self.process, "port"))

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def delay(self) -> float:
        return self._delay

    @delay.setter
    def delay(self, seconds: float) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{seconds * 1000.0}\n")
        self.process.stdin.flush()
        _expect(self.process, "delay")
        self._delay = seconds

    def stop(self) -> None:
        _end(self.process)


@contextlib.contextmanager
def echo_process(host: str, *, prefix: Sequence[str] = ()) -> Iterator[tuple[str, int]]:
    """An echo server in a process of its own (in a namespace, by `prefix`)."""
    process = _spawn(prefix, "echo", "--host", host)
    try:
        yield host, int(_expect(process, "port"))
    finally:
        _end(process)


def ping_from(
    address: tuple[str, int], *, rounds: int, size: int = 64, prefix: Sequence[str] = ()
) -> list[float]:
    """`ping` run by a process of its own (in a namespace, by `prefix`)."""
    process = _spawn(
        prefix, "ping", "--to", f"{address[0]}:{address[1]}", "--rounds", str(rounds),
        "--size", str(size),
    )  # fmt: skip
    seconds = json.loads(_expect(process, "seconds"))
    _end(process)
    return [float(s) for s in seconds]


def _spawn(prefix: Sequence[str], *args: str) -> subprocess.Popen[str]:
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return subprocess.Popen(
        [*prefix, sys.executable, "-m", "tests.support.relay", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=root,
        env=env,
    )


def _expect(process: subprocess.Popen[str], word: str) -> str:
    """The rest of the process's next stdout line, which must start with `word`."""
    assert process.stdout is not None
    line = process.stdout.readline().split(maxsplit=1)
    if not line or line[0] != word:
        _end(process)
        raise RuntimeError(f"relay process: expected {word!r}, got {line!r}")
    return line[1] if len(line) > 1 else ""


def _end(process: subprocess.Popen[str]) -> None:
    """Close its stdin (it ends on end of input) and wait; kill it if it lingers."""
    with contextlib.suppress(OSError):
        if process.stdin is not None:
            process.stdin.close()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def summary(seconds: list[float]) -> tuple[float, float, float]:
    """(median, p90, max) in milliseconds."""
    ordered = sorted(seconds)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return statistics.median(ordered) * 1000, p90 * 1000, ordered[-1] * 1000


def main() -> int:
    """`serve`: a relay (prints `port N`, then reads one-way delays in ms, one a line,
    answering `delay`; ends at end of input); `echo`: an echo server (prints `port N`,
    ends at end of input); `ping`: round trips to an echo server (prints `seconds [...]`)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve")
    serve.add_argument("--host", required=True)
    serve.add_argument("--target", required=True)
    serve.add_argument("--one-way-ms", type=float, default=0.0)
    echo = commands.add_parser("echo")
    echo.add_argument("--host", required=True)
    pinger = commands.add_parser("ping")
    pinger.add_argument("--to", required=True)
    pinger.add_argument("--rounds", type=int, default=200)
    pinger.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    if args.command == "serve":
        host, port = args.target.rsplit(":", 1)
        front = Relay((host, int(port)), one_way_ms=args.one_way_ms, host=args.host).start()
        print(f"port {front.port}", flush=True)
        for line in sys.stdin:
            front.delay = float(line) / 1000.0
            print(f"delay {line.strip()}", flush=True)
        front.stop()
    elif args.command == "echo":
        with echo_server(args.host) as (_, port):
            print(f"port {port}", flush=True)
            sys.stdin.read()
    else:
        host, port = args.to.rsplit(":", 1)
        seconds = ping((host, int(port)), rounds=args.rounds, size=args.size)
        print(f"seconds {json.dumps(seconds)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
