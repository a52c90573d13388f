"""The computation side of a loaded stage: the worker loop over `StageRuntime`, its
micro-batches, and failure propagation back to stage 0.

A `Worker` (every stage but 0) takes the micro-batches the RPC handler queued, runs them
through the slice in the one compute thread, and passes the result on: hidden states to
the next stage, or (the last stage) sampled token ids back to stage 0. A step that fails
fails its sequences at stage 0 (`Fail`) and frees them here. A `Head` (stage 0) hands
the coordinator's output to stage 1 and frees finished sequences on every stage. Both are
built complete, after loading, by `llmpipe_stage.server`; neither speaks gRPC as a server
nor HTTP (`llmpipe_stage.handler` and `llmpipe_stage.gateway` do).

`Ledger` is the per-sequence bookkeeping the handler validates against: the position each
sequence may send next and the sequences released recently. `OrderedSender` keeps one
stage's micro-batches to its next stage in order per sequence (a prompt's chunk i + 1 never
leaves before chunk i has arrived).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import torch

from llmpipe_stage import wire
from llmpipe_stage.background import TaskSet
from llmpipe_stage.coordinator import Coordinator, CoordinatorSettings
from llmpipe_stage.draft import DraftModel
from llmpipe_stage.metrics import StageMetrics
from llmpipe_stage.peers import Peers, rpc_failure
from llmpipe_stage.proto import stage_pb2
from llmpipe_stage.runtime import StageRuntime, StepError

log = logging.getLogger(__name__)


@dataclass
class LoadProgress:
    """How far this stage's start has come (its /healthz and the `Info` RPC read it)."""

    phase: str = "starting"  # starting -> loading -> ready | failed
    loaded: int = 0
    total: int = 0
    error: str = ""
    started: float = field(default_factory=time.monotonic)

    @property
    def ready(self) -> bool:
        return self.phase == "ready"


class Ledger:
    """Which position each sequence may send next, and which sequences were released."""

    KEEP_RELEASED = 65536
    """Released ids remembered (a step of one may still be in flight); the oldest go first."""

    def __init__(self) -> None:
        self.expected: dict[int, int] = {}  # sequence -> next position it may send here
        self.released: OrderedDict[int, None] = OrderedDict()
        self._moved: asyncio.Event | None = None  # set when expected or released change

    def _ahead(self, steps: list[wire.Step]) -> bool:
        """Whether a step starts past its sequence's next position (an earlier chunk of
        the same prompt is still on its way: two messages of one hop may overtake)."""
        return any(
            step.sequence_id not in self.released
            and step.position > self.expected.get(step.sequence_id, 0)
            for step in steps
        )

    async def wait_in_order(self, steps: list[wire.Step], *, timeout: float) -> None:
        """Return once no step is ahead of its sequence, or after `timeout` (the check
        that follows then names the gap)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._ahead(steps) and loop.time() < deadline:
            if self._moved is None:
                self._moved = asyncio.Event()
            moved = self._moved
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(moved.wait(), deadline - loop.time())

    def _wake(self) -> None:
        if self._moved is not None:
            self._moved.set()
            self._moved = None

    def check(self, steps: list[wire.Step], *, context_limit: int) -> None:
        """Raise WireError unless every step continues its sequence within the limit."""
        for step in steps:
            sid = step.sequence_id
            if sid in self.released:
                continue  # released while in flight: dropped by the worker
            expected = self.expected.get(sid, 0)
            if step.rollback and step.position < expected:  # past rejected draft positions
                expected = step.position
            if step.position != expected:
                raise wire.WireError(
                    f"sequence {sid}: step at position {step.position}, expected {expected}"
                )
            overflow = wire.context_overflow(step, context_limit)
            if overflow is not None:
                raise wire.WireError(overflow)

    def expect(self, steps: list[wire.Step]) -> None:
        for step in steps:
            self.expected[step.sequence_id] = step.position + step.length
        self._wake()

    def release(self, ids: list[int]) -> None:
        for sid in ids:
            self.expected.pop(sid, None)
            self.released[sid] = None
        while len(self.released) > self.KEEP_RELEASED:
            self.released.popitem(last=False)
        self._wake()


@dataclass(frozen=True)
class Timeouts:
    forward_s: float
    """Deadline of one hop; a neighbour that does not take a micro-batch in time is down."""
    cache_s: float
    """A KV cache idle this long is freed (its stage 0 is gone or forgot to release it)."""


class OrderedSender:
    """The sends of one stage to its next stage. Two micro-batches on the same link as two
    concurrent calls can arrive swapped (a large message and a small one behind it); for
    two chunks of one prompt that is out of order. So a micro-batch that carries a sequence
    whose previous micro-batch to this stage has not been acknowledged yet waits for that
    acknowledgement first; every other micro-batch goes at once (a decode step's previous
    step came back around the ring long ago, so decode never waits here). The receiver
    still checks the order (`Ledger.wait_in_order`) as a defence."""

    def __init__(self) -> None:
        self._latest: dict[int, asyncio.Future[None]] = {}  # sequence id -> its last send

    async def send(self, ids: list[int], call: Callable[[], Awaitable[object]]) -> None:
        """Run `call` (the RPC) once every earlier send of these sequences is done (sent
        and acknowledged, or failed). Callers start sends in the order they must arrive."""
        earlier = {self._latest[sid] for sid in ids if sid in self._latest}
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for sid in ids:
            self._latest[sid] = done
        try:
            if earlier:
                await asyncio.wait(earlier)
            await call()
        finally:
            done.set_result(None)
            for sid in ids:
                if self._latest.get(sid) is done:
                    del self._latest[sid]


@dataclass(frozen=True)
class Parts:
    """What a loaded stage is made of; `llmpipe_stage.server` builds it once loading is done."""

    runtime: StageRuntime
    executor: ThreadPoolExecutor
    """The one compute thread: torch runs there, so the event loop keeps moving bytes."""
    metrics: StageMetrics
    peers: Peers
    ledger: Ledger
    timeouts: Timeouts


class Backend:
    """What every loaded stage shares: its runtime, compute thread, ledger and caches."""

    def __init__(self, parts: Parts) -> None:
        self.index = parts.peers.index
        self.runtime = parts.runtime
        self.hidden_size = int(parts.runtime.stage.config.hidden_size)
        self.executor = parts.executor
        self.metrics = parts.metrics
        self.peers = parts.peers
        self.ledger = parts.ledger
        self.timeouts = parts.timeouts
        self.background = TaskSet()
        self.next_stage = OrderedSender()  # Forward to stage index + 1

    async def release(self, ids: list[int]) -> None:
        """Free these sequences here (the ledger at once, the caches in the compute thread)."""
        self.ledger.release(ids)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, self.runtime.release, ids)
        self.metrics.measure_caches(self.runtime)

    async def sweep(self) -> None:
        """Free caches nobody used for cache_s (stage 0 died or lost the sequence)."""
        while True:
            await asyncio.sleep(min(10.0, self.timeouts.cache_s / 4))
            expired = self.runtime.expired(self.timeouts.cache_s)
            if expired:
                log.warning("stage %d: freeing %d idle KV caches", self.index, len(expired))
                await self.release(expired)


class Worker(Backend):
    """Every stage but 0: the loop over queued micro-batches."""

    def __init__(self, parts: Parts, *, is_last: bool) -> None:
        super().__init__(parts)
        self.is_last = is_last
        self.queue: asyncio.Queue[tuple[list[wire.Step], torch.Tensor]] = asyncio.Queue()

    def enqueue(self, steps: list[wire.Step], hidden: torch.Tensor) -> None:
        """A checked micro-batch from the previous stage (the handler validated it)."""
        self.ledger.expect(steps)
        self.queue.put_nowait((steps, hidden))

    async def work(self) -> None:
        """Take every queued micro-batch, run them as one, pass the result on; forever."""
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            for run in _disjoint_runs(items):
                await self._run(loop, run)

    async def _run(
        self,
        loop: asyncio.AbstractEventLoop,
        items: list[tuple[list[wire.Step], torch.Tensor]],
    ) -> None:
        """Queued micro-batches with no sequence twice, as one step of the slice."""
        steps = [step for batch, _ in items for step in batch]
        hidden = torch.cat([h for _, h in items]) if len(items) > 1 else items[0][1]
        started = time.perf_counter()
        try:
            kept, output = await loop.run_in_executor(self.executor, self._compute, steps, hidden)
        except StepError as error:
            await self.fail_upstream([s.sequence_id for s in steps], str(error))
            return
        except Exception as error:  # any failure fails these requests; the loop lives on
            log.exception("stage %d: compute failed", self.index)
            reason = f"stage {self.index} failed: {type(error).__name__}: {error}"
            await self.fail_upstream([s.sequence_id for s in steps], reason)
            return
        self.metrics.compute.observe(time.perf_counter() - started)
        self.metrics.batch_tokens.observe(int(hidden.shape[0]))
        self.metrics.measure_caches(self.runtime)
        if kept or (isinstance(output, wire.Sampled) and output.chunks):
            self.background.spawn(self._pass_on(kept, output))

    def _compute(
        self, steps: list[wire.Step], hidden: torch.Tensor
    ) -> tuple[list[wire.Step], torch.Tensor | wire.Sampled]:
        """In the compute thread. hidden: [sum(step.length), hidden_size]."""
        # Sequences released while their step waited here are dropped, not recomputed.
        live = [i for i, s in enumerate(steps) if s.sequence_id not in self.ledger.released]
        if len(live) != len(steps):
            offsets = wire.token_offsets(steps)
            hidden = (
                torch.cat([hidden[offsets[i] : offsets[i + 1]] for i in live])
                if live
                else hidden[:0]
            )
            steps = [steps[i] for i in live]
        if not steps:
            return [], hidden
        out = self.runtime.run(steps, hidden)
        if self.is_last:  # partial prompt chunks return no token, only that they ran
            sampled = self.runtime.sample_scored(steps, out)
            sampled.chunks = [(s.sequence_id, s.length) for s in steps if s.partial]
            return wire.sampled_steps(steps), sampled
        return steps, out

    async def _pass_on(self, steps: list[wire.Step], output: torch.Tensor | wire.Sampled) -> None:
        ids = [s.sequence_id for s in steps]
        if isinstance(output, wire.Sampled):
            message = wire.encode_tokens(ids, output)
            target = 0
            call = self.peers.stub(0).ReturnTokens
        else:
            message = wire.encode_activations(steps, output, sent_unix_ns=time.time_ns())
            target = self.index + 1
            call = self.peers.stub(target).Forward
        try:
            started = time.perf_counter()
            if target == 0:
                await call(message, timeout=self.timeouts.forward_s)
            else:
                await self.next_stage.send(
                    ids, lambda: call(message, timeout=self.timeouts.forward_s)
                )
            self.metrics.send.observe(time.perf_counter() - started)
            self.metrics.bytes_sent.inc(message.ByteSize())
        except grpc.aio.AioRpcError as error:
            reason = rpc_failure(error, self.peers.describe(target))
            log.warning("stage %d: %s", self.index, reason)
            await self.fail_upstream(ids, reason)

    async def fail_upstream(self, ids: list[int], reason: str) -> None:
        """Tell stage 0 these sequences failed here, and free them locally."""
        await self.release(ids)
        try:
            await self.peers.stub(0).Fail(
                stage_pb2.Failure(sequence_ids=ids, stage_index=self.index, reason=reason),
                timeout=self.timeouts.forward_s,
            )
        except grpc.aio.AioRpcError as error:
            log.warning(
                "stage %d: cannot report failure to stage 0: %s", self.index, error.code().name
            )


def _disjoint_runs(
    items: list[tuple[list[wire.Step], torch.Tensor]],
) -> list[list[tuple[list[wire.Step], torch.Tensor]]]:
    """Split queued micro-batches, in order, into runs in which no sequence appears twice
    (successive chunks of one prompt run one after the other, each over the last's cache)."""
    runs: list[list[tuple[list[wire.Step], torch.Tensor]]] = []
    seen: set[int] = set()
    for item in items:
        ids = {step.sequence_id for step in item[0]}
        if not runs or ids & seen:
            runs.append([])
            seen = set()
        runs[-1].append(item)
        seen |= ids
    return runs


class Head(Backend):
    """Stage 0: the coordinator's ring, its hop to stage 1 and its releases everywhere."""

    def __init__(
        self,
        parts: Parts,
        *,
        coordinator: CoordinatorSettings,
        draft_model: DraftModel | None = None,
    ) -> None:
        super().__init__(parts)
        forward = self.forward if coordinator.num_stages > 1 else None
        self.coordinator = Coordinator(
            coordinator,
            runtime=self.runtime,
            executor=self.executor,
            metrics=self.metrics,
            forward=forward,
            release_remote=self.release_remote,
            chain_ready=self.peers.readiness,
            chain_lost=self.peers.lost,
            draft_model=draft_model,
        )

    async def forward(self, steps: list[wire.Step], hidden: torch.Tensor) -> None:
        """Hand stage 0's layers' output to stage 1; a failed hop fails the sequences."""
        message = wire.encode_activations(steps, hidden, sent_unix_ns=time.time_ns())
        ids = [s.sequence_id for s in steps]
        stub = self.peers.stub(1)
        try:
            started = time.perf_counter()
            await self.next_stage.send(
                ids, lambda: stub.Forward(message, timeout=self.timeouts.forward_s)
            )
            self.metrics.send.observe(time.perf_counter() - started)
            self.metrics.bytes_sent.inc(message.ByteSize())
        except grpc.aio.AioRpcError as error:
            reason = rpc_failure(error, self.peers.describe(1))
            log.warning("stage 0: %s", reason)
            self.coordinator.on_failure(ids, reason)

    async def release_remote(self, ids: list[int]) -> None:
        self.ledger.release(ids)
        await self.peers.release(ids, timeout=self.timeouts.forward_s)
