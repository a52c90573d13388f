"""A re-plan switch under load loses no request: 8 clients loop for 30 s over greedy
completions, streamed and whole, while the front moves from one plan to another; none
fails and every output equals the single-process reference.

What runs: two full plans of one tiny model as real stage processes with mutual TLS, as
the operator's pods run them (`--drain-timeout 50`): the old plan's 2 stages hold layers
[0, 2) and [2, 4), the new plan's [0, 1) and [1, 4) (a different split, its own
certificates; two stages each keep the test's start within its time on 2 shared cores).
In front of them a TCP proxy on loopback plays the user-facing Service: each new
connection goes to the stage 0 the Service selects now, and a connection keeps the
backend it opened on, as kube-proxy does. The new plan starts beside the old one under
the load; once it is ready (and at least 8 s in) the front switches to it (what the
operator's switch does to the Service's selector), and the old plan drains: its stage 0
is read as the operator's drain task reads it (`reconcile.drain.busy_requests` over its
/metrics) and the operator's own decision (`rollout.drain_over`, with the default bound)
says when it is over; then every old stage gets SIGTERM at once, as the kubelet sends it
when the operator deletes the old plan's Deployments.

Why a proxy and not the operator on the cluster tier: the cluster tier's pods are kwok's
(no process behind them), and real pods need the nodes tier's image (opt-in, tens of
minutes); the operator's part of the switch (Service, EndpointSlices, drain Events) is
tested there (tests/cluster/replan). What this test adds is the part only real
processes show: the requests in flight at the switch finish on the old plan, the new
plan takes the rest, and SIGTERM on an empty stage 0 costs nothing.

Clients open one connection per request (kube-proxy balances connections, not requests;
a client that keeps a connection alive stays on the old stage 0 until it closes it, see
docs/operator.md, "Drain").
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmpipe_operator import rollout
from llmpipe_operator.planning import replan
from llmpipe_operator.reconcile import drain
from llmpipe_stage import config as stage_config
from tests.dataplane import pipelines

PROMPTS = [[5 + i, 17, 3 * i + 1, 40, 9 * i + 2] for i in range(8)]
MAX_NEW = [12 + 4 * i for i in range(8)]  # 12..40 tokens: requests end at different times
CLIENTS = 8
LOAD_S = 30.0
BEFORE_SWITCH_S = 8.0
"""Load on the old plan alone, at least, before the switch."""
AFTER_SWITCH_S = 12.0
"""Load on the new plan, at least, after it."""


@dataclass
class Load:
    """When the clients stop: set at the switch (30 s in all, or later if the new plan came
    up late, so that the new plan serves for AFTER_SWITCH_S)."""

    deadline: float = float("inf")


@dataclass
class Connection:
    backend: str
    opened: float
    closed: float | None = None


class Front:
    """A TCP proxy on loopback that sends each new connection to the current backend."""

    def __init__(self, backends: dict[str, int], current: str) -> None:
        self.backends, self.current = backends, current
        self.connections: list[Connection] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._server: asyncio.Server | None = None

    def route_to(self, backend: str) -> None:
        self.current = backend  # read once per accepted connection, in the loop's thread

    @contextlib.contextmanager
    def running(self) -> Iterator[Front]:
        self._thread.start()
        assert self._started.wait(10)
        try:
            yield self
        finally:
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._accept, "127.0.0.1", 0)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._started.set()
        self._loop.run_forever()

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        record = Connection(self.current, time.monotonic())
        self.connections.append(record)
        try:
            up_reader, up_writer = await asyncio.open_connection(
                "127.0.0.1", self.backends[record.backend]
            )
        except OSError:
            writer.close()
            record.closed = time.monotonic()
            return
        await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        record.closed = time.monotonic()


async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(ConnectionError, OSError):
            sink.close()


@dataclass
class Outcome:
    prompt: int
    stream: bool
    status: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    error: str = ""
    done: bool = False  # a stream ended with [DONE]


def ask(port: int, prompt: int, *, stream: bool) -> Outcome:
    body: dict[str, Any] = {
        "model": "tiny",
        "prompt": PROMPTS[prompt],
        "max_tokens": MAX_NEW[prompt],
        "temperature": 0,
        "stream": stream,
        "return_token_ids": not stream,
    }
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request(
            "POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        outcome = Outcome(prompt, stream, response.status)
        if not stream or response.status != 200:
            answer = json.loads(response.read() or b"{}")
            if response.status != 200:
                outcome.error = json.dumps(answer)
            else:
                choice = answer["choices"][0]
                outcome.text, outcome.token_ids = choice["text"], choice["token_ids"]
            return outcome
        while line := response.readline():
            line = line.strip()
            if line == b"data: [DONE]":
                outcome.done = True
            elif line.startswith(b"data: {"):
                event = json.loads(line.removeprefix(b"data: "))
                if "error" in event:
                    outcome.error = json.dumps(event)
                else:
                    outcome.text += event["choices"][0]["text"]
        return outcome
    except (OSError, http.client.HTTPException) as error:
        return Outcome(prompt, stream, 0, error=repr(error))
    finally:
        connection.close()


def client_loop(port: int, number: int, load: Load) -> list[Outcome]:
    outcomes = []
    turn = number
    while time.monotonic() < load.deadline:
        outcomes.append(ask(port, turn % len(PROMPTS), stream=turn % 2 == 0))
        turn += 3
    return outcomes


def busy(pipeline: pipelines.Pipeline) -> int | None:
    """The old stage 0's requests in progress, read as the operator's drain task reads it."""
    try:
        with contextlib.closing(
            http.client.HTTPConnection("127.0.0.1", pipeline.http_ports[0], timeout=2)
        ) as connection:
            connection.request("GET", "/metrics")
            return drain.busy_requests(connection.getresponse().read().decode())
    except OSError:
        return None


def drain_then_sigterm(old: pipelines.Pipeline, *, switched_at: float) -> tuple[str, float, int]:
    """The operator's drain of the old plan: look every 0.5 s until `rollout.drain_over`
    says it is over, then SIGTERM every old stage at once. Returns why, when, and the
    last count read."""
    bound = replan.ReplanSettings().drain_seconds
    while True:
        count = busy(old)
        over = rollout.drain_over(
            draining_s=time.monotonic() - switched_at, bound_s=bound, busy=count
        )
        if over is not None:
            at = time.monotonic()
            for process in old.processes:
                process.send_signal(signal.SIGTERM)
            return over, at, -1 if count is None else count
        time.sleep(0.5)


def test_a_switch_under_8_streams_of_load_fails_nothing_and_every_output_is_exact(
    model_dirs: dict[str, Path], start_pipeline
) -> None:
    from transformers import AutoTokenizer

    model_dir = model_dirs["llama-gqa"]
    options = {"max_context": 256, "extra_args": ("--drain-timeout", "50")}
    even = stage_config.even_plan(4, 2)  # the old plan's split: [0, 2), [2, 4)
    new_split = {
        **even,
        "stages": [
            {**stage, "layerStart": a, "layerEnd": b}
            for stage, (a, b) in zip(even["stages"], [(0, 1), (1, 4)], strict=True)
        ],
    }
    with ThreadPoolExecutor(2) as pool:
        references = pool.submit(pipelines.reference_tokens, model_dir, PROMPTS, MAX_NEW)
        old = start_pipeline(model_dir, stages=2, **options)
        expected = references.result()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in expected]

    front = Front({"old": old.http_ports[0]}, current="old")
    with front.running(), ThreadPoolExecutor(CLIENTS + 1) as pool:
        began = time.monotonic()
        load = Load()
        loops = [pool.submit(client_loop, front.port, n, load) for n in range(CLIENTS)]
        # The new plan comes up beside the serving one, under its load, as a re-plan's does.
        new = pool.submit(start_pipeline, model_dir, stages=2, plan=new_split, **options)
        front.backends["new"] = new.result().http_ports[0]
        time.sleep(max(0.0, began + BEFORE_SWITCH_S - time.monotonic()))
        front.route_to("new")  # every stage of the new plan is ready: switch
        switched_at = time.monotonic()
        load.deadline = max(began + LOAD_S, switched_at + AFTER_SWITCH_S)
        reason, sigterm_at, last_count = drain_then_sigterm(old, switched_at=switched_at)
        exits = [process.wait(30) for process in old.processes]
        exited_at = time.monotonic()
        outcomes = [o for loop in loops for o in loop.result()]

    failed = [o for o in outcomes if o.status != 200 or o.error or (o.stream and not o.done)]
    assert failed == [], failed[:5]
    wrong = [
        (o.prompt, o.stream)
        for o in outcomes
        if (o.text != texts[o.prompt]) or (not o.stream and o.token_ids != expected[o.prompt])
    ]
    assert wrong == [], wrong[:5]
    # The switch happened under load: both plans answered, and requests that began on the
    # old plan before the switch finished on it after (the drain served them).
    on_old = [c for c in front.connections if c.backend == "old"]
    on_new = [c for c in front.connections if c.backend == "new"]
    drained = [c for c in on_old if c.closed is not None and c.closed > switched_at]
    assert all(c.opened < switched_at for c in on_old)
    assert len(on_old) >= CLIENTS and len(on_new) >= CLIENTS, (len(on_old), len(on_new))
    assert drained, "no request was in flight on the old plan at the switch"
    # The drain ended as soon as the old stage 0 was empty (not at the 120 s bound), and
    # every old stage, SIGTERMed with nothing left to serve, exited cleanly at once.
    assert (reason, last_count) == ("empty", 0)
    assert exits == [0, 0], old.logs()
    print(
        f"\n{len(outcomes)} requests ({sum(o.stream for o in outcomes)} streamed), "
        f"{len(on_old)} on the old plan ({len(drained)} finished after the switch), "
        f"{len(on_new)} on the new; drained {sigterm_at - switched_at:.1f} s after the "
        f"switch ({reason}); old stages exited {exited_at - sigterm_at:.1f} s after SIGTERM; "
        f"switched {switched_at - began:.1f} s into {load.deadline - began:.1f} s of load"
    )
    assert exited_at - sigterm_at < 15, "an empty stage drains in seconds, not its 50 s bound"
