"""Stage 0's side of the recurrent pipeline: sequences, admission, micro-batches, the ring.

Each request becomes a `Sequence`. At most `max_sequences` are in flight; the rest wait
(the queue depth metric). A sequence is *ready* when it has a step to run: its prompt, or
the token the last stage just returned. The scheduling loop takes ready sequences in
micro-batches of about in_flight / num_stages, so while stage k works on one micro-batch
stage k-1 works on the next; it embeds them, runs stage 0's layers and sends the hidden
states on (or samples directly when the pipeline has one stage). When a sequence ends, is
cancelled, fails or times out, its cache is freed here and on every other stage.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import secrets
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import torch

from llmpipe_stage.background import TaskSet
from llmpipe_stage.generation import PipelineError, SamplingParams, Scores
from llmpipe_stage.metrics import StageMetrics
from llmpipe_stage.runtime import StageRuntime
from llmpipe_stage.wire import Sampled, Step

log = logging.getLogger(__name__)


class _End:
    """Put on a sequence's events when the pipeline has finished it."""


_END = _End()


@dataclass(eq=False)
class Sequence:
    id: int
    prompt: list[int]
    params: SamplingParams
    created: float = field(default_factory=time.monotonic)
    generated: list[int] = field(default_factory=list)
    events: asyncio.Queue[int | PipelineError | _End] = field(default_factory=asyncio.Queue)
    step_sent_at: float | None = None  # monotonic time its current step left stage 0
    finished: bool = False
    admitted: bool = False
    outcome: str = "cancelled"  # set to "ok" or "failed" when the pipeline ends it
    scores: Scores | None = None

    @property
    def position(self) -> int:
        """Tokens already in the caches."""
        return len(self.prompt) + len(self.generated) - (1 if self.generated else 0)

    def next_step(self) -> tuple[Step, list[int]]:
        if not self.generated:
            sampling = self.params.to_message(self.prompt)
            return Step(self.id, 0, len(self.prompt), sampling), self.prompt
        return Step(self.id, self.position, 1), [self.generated[-1]]


@dataclass(frozen=True)
class CoordinatorSettings:
    num_stages: int
    max_sequences: int
    """Sequences in flight at once; the planner sized every stage's KV cache for this many."""
    context_limit: int
    eos_token_ids: frozenset[int]
    step_timeout_s: float = 30.0
    """A step with no token back after this long fails its request (a stage is stuck)."""
    micro_batches: int | None = None
    """Micro-batches kept in the ring; default one per stage so every stage has work."""


SendFn = Callable[[list[Step], list[int]], Awaitable[None]]


class Coordinator:
    def __init__(
        self,
        settings: CoordinatorSettings,
        *,
        runtime: StageRuntime,
        executor: Executor,
        metrics: StageMetrics,
        forward: Callable[[list[Step], torch.Tensor], Awaitable[None]] | None,
        release_remote: Callable[[list[int]], Awaitable[None]],
    ) -> None:
        self.settings = settings
        self.runtime = runtime
        self.executor = executor
        self.metrics = metrics
        self.forward = forward  # None when the pipeline has one stage
        self.release_remote = release_remote
        self.sequences: dict[int, Sequence] = {}
        self.ready: asyncio.Queue[Sequence] = asyncio.Queue()
        self.slots = asyncio.Semaphore(settings.max_sequences)
        self.waiting = 0
        self._ids = itertools.count(secrets.randbits(40) << 20)
        self.background = TaskSet()
        self.last_token_at = float("-inf")  # monotonic time a token last came back
        self.last_failure_at = float("-inf")  # monotonic time a failure was last reported

    # -- the gateway's API -----------------------------------------------------------------
    async def generate(
        self, prompt: list[int], params: SamplingParams, *, scores: Scores | None = None
    ) -> AsyncGenerator[int, None]:
        """Yield the sequence's tokens; raises PipelineError. Leaving early frees it.
        `scores` receives the log-probabilities `params` asks for."""
        sequence = Sequence(next(self._ids), list(prompt), params, scores=scores)
        try:
            await self._admit(sequence)
            while True:
                event = await sequence.events.get()
                if isinstance(event, _End):
                    return
                if isinstance(event, PipelineError):
                    raise event
                yield event
        finally:
            self._finish(sequence)

    async def _admit(self, sequence: Sequence) -> None:
        self.waiting += 1
        self.metrics.queue_depth.set(self.waiting)
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
            self.metrics.queue_depth.set(self.waiting)
        sequence.admitted = True
        self.sequences[sequence.id] = sequence
        self.metrics.in_flight.set(len(self.sequences))
        self.ready.put_nowait(sequence)

    def _finish(self, sequence: Sequence) -> None:
        if not sequence.admitted or self.sequences.pop(sequence.id, None) is None:
            return
        sequence.finished = True
        self.slots.release()
        self.metrics.in_flight.set(len(self.sequences))
        self.metrics.requests.labels(outcome=sequence.outcome).inc()
        self.background.spawn(self._release_everywhere([sequence.id]))

    async def _release_everywhere(self, ids: list[int]) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, self._release_measured, ids)
        await self.release_remote(ids)

    def _release_measured(self, ids: list[int]) -> None:
        self.runtime.release(ids)
        self.metrics.measure_caches(self.runtime)

    # -- ring events (from the server) -----------------------------------------------------
    def progressing(self, *, within_s: float) -> bool:
        """Whether a token came back around the ring in the last `within_s` seconds, with
        no failure reported since."""
        return (
            time.monotonic() - self.last_token_at < within_s
            and self.last_token_at > self.last_failure_at
        )

    def on_tokens(self, sequence_ids: list[int], sampled: Sampled) -> None:
        now = time.monotonic()
        self.last_token_at = now
        self.metrics.count_tokens(len(sampled.tokens))
        for row, (sid, token) in enumerate(zip(sequence_ids, sampled.tokens, strict=True)):
            sequence = self.sequences.get(sid)
            if sequence is None or sequence.finished:
                continue  # cancelled while its step was in the ring
            if sequence.scores is not None:
                if sampled.logprobs is not None:
                    sequence.scores.tokens.append(sampled.logprobs[row])
                if sid in sampled.prompt_logprobs:
                    sequence.scores.prompt = sampled.prompt_logprobs[sid]
            if not sequence.generated:
                self.metrics.ttft.observe(now - sequence.created)
            sequence.generated.append(token)
            sequence.step_sent_at = None
            sequence.events.put_nowait(token)
            done = (
                (token in self.settings.eos_token_ids and not sequence.params.ignore_eos)
                or len(sequence.generated) >= sequence.params.max_new_tokens
                or sequence.position + 1 >= self.settings.context_limit
            )
            if done:
                sequence.finished = True
                sequence.outcome = "ok"
                sequence.events.put_nowait(_END)
            else:
                self.ready.put_nowait(sequence)

    def on_failure(self, sequence_ids: list[int], reason: str) -> None:
        self.last_failure_at = time.monotonic()
        for sid in sequence_ids:
            sequence = self.sequences.get(sid)
            if sequence is not None and not sequence.finished:
                sequence.finished = True
                sequence.outcome = "failed"
                sequence.events.put_nowait(PipelineError(reason))

    # -- the scheduling loop ---------------------------------------------------------------
    async def run(self) -> None:
        """Form micro-batches of ready sequences and push them into the ring, forever."""
        self.background.spawn(self._watch_timeouts())
        while True:
            batch = await self._next_micro_batch()
            if batch:
                await self._process(batch)

    async def _next_micro_batch(self) -> list[Sequence]:
        first = await self.ready.get()
        batch = [first]
        parts = self.settings.micro_batches or self.settings.num_stages
        cap = max(1, math.ceil(len(self.sequences) / parts))
        while len(batch) < cap and not self.ready.empty():
            batch.append(self.ready.get_nowait())
        return [s for s in batch if not s.finished and s.id in self.sequences]

    async def _process(self, batch: list[Sequence]) -> None:
        steps: list[Step] = []
        token_ids: list[int] = []
        for sequence in batch:
            step, ids = sequence.next_step()
            steps.append(step)
            token_ids.extend(ids)
            sequence.step_sent_at = time.monotonic()
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            result = await loop.run_in_executor(self.executor, self._compute, steps, token_ids)
        except Exception as error:
            log.exception("stage 0 compute failed")
            self.on_failure([s.sequence_id for s in steps], f"stage 0 failed: {error}")
            return
        self.metrics.compute.observe(time.perf_counter() - started)
        self.metrics.batch_tokens.observe(len(token_ids))
        if isinstance(result, Sampled):  # a one-stage pipeline samples here
            self.on_tokens([s.sequence_id for s in steps], result)
        elif self.forward is not None:
            self.background.spawn(self.forward(steps, result))

    def _compute(self, steps: list[Step], token_ids: list[int]) -> torch.Tensor | Sampled:
        hidden = self.runtime.embed(token_ids)  # [tokens, hidden_size]
        hidden = self.runtime.run(steps, hidden)
        self.metrics.measure_caches(self.runtime)
        if self.forward is None:
            return self.runtime.sample_scored(steps, hidden)
        return hidden

    async def _watch_timeouts(self) -> None:
        timeout = self.settings.step_timeout_s
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            now = time.monotonic()
            stuck = [
                s.id
                for s in self.sequences.values()
                if s.step_sent_at is not None and now - s.step_sent_at > timeout
            ]
            if stuck:
                self.on_failure(
                    stuck,
                    f"no token came back from the pipeline within "
                    f"{timeout:g} s (a stage may be stuck or overloaded)",
                )
