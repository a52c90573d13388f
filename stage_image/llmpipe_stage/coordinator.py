"""Stage 0's side of the recurrent pipeline: sequences, admission, micro-batches, the ring.

Each request becomes a `Sequence`. At most `max_sequences` are in flight; the rest wait
(the queue depth metric). A sequence is *ready* when it has a step to run: its prompt, or
the token the last stage just returned. The scheduling loop takes ready sequences in
micro-batches of about in_flight / num_stages, so while stage k works on one micro-batch
stage k-1 works on the next; it embeds them, runs stage 0's layers and sends the hidden
states on (or samples directly when the pipeline has one stage). When a sequence ends, is
cancelled, fails or times out, its cache is freed here and on every other stage.

When a stage fails under the ring (a hop fails, a stage reports a failure, a late step
finds a stage refusing connections or loading again, a step times out), every sequence in
the ring is *parked*: its caches are freed everywhere, its client
waits. Stage 0 still holds each one's prompt and generated tokens, so once every stage
answers ready again (asked every `RESUME_POLL_S`), each parked sequence is *replayed*
under a fresh id: prompt + generated tokens as one prefill, which rebuilds every stage's
KV cache and samples the next token (greedy: the token an uninterrupted run samples). A
sequence still parked after `resume_timeout_s` fails with a `PipelineError` that says so.
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
from dataclasses import dataclass, field, replace

import torch

from llmpipe_stage import prefill, speculation, wire
from llmpipe_stage.background import TaskSet
from llmpipe_stage.draft import DraftModel
from llmpipe_stage.generation import PipelineError, SamplingParams, Scores
from llmpipe_stage.metrics import StageMetrics
from llmpipe_stage.prefill import TokenBudget
from llmpipe_stage.runtime import StageRuntime
from llmpipe_stage.speculation import DEFAULT_MAX_DRAFT, AdaptiveDraft
from llmpipe_stage.wire import Sampled, Step, sampled_steps

log = logging.getLogger(__name__)


class _End:
    """Put on a sequence's events when the pipeline has finished it."""


_END = _End()

RESUME_POLL_S = 0.25
"""How often parked sequences ask whether every stage is ready again."""

LATE_STEP_S = 2.0
"""A step with no token back after this long makes stage 0 ask whether a stage was lost
(`ChainLost`): a stage killed while it held the only step in the ring fails no hop, so
without the question a lone stream would wait for the whole step timeout."""


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
    closed: bool = False  # its client is gone (the slot is free again)
    paused_since: float | None = None  # monotonic time it was parked, until a token is back
    pause_reason: str = ""
    replay: bool = False  # its next step rebuilds the caches from prompt + generated
    resumes: int = 0
    context_room: int = 0  # the context limit (set on admission when drafting)
    prefill_sent: int = 0  # prompt (or replayed history) tokens sent in earlier chunks
    prefill_out: int = 0  # its prompt tokens in flight: sent, not yet run by the last stage
    drafter: AdaptiveDraft | None = None  # speculative decoding (no logprobs asked)
    drafted: int = 0  # draft tokens of the step in flight
    rollback: bool = False  # the caches past position hold rejected draft positions
    proposed: list[int] | None = None  # the draft model's tokens for its next step

    @property
    def position(self) -> int:
        """Tokens already in the caches."""
        return len(self.prompt) + len(self.generated) - (1 if self.generated else 0)

    @property
    def prefilling(self) -> bool:
        """Whether its next step is (a chunk of) a prefill rather than a decode step."""
        return not self.generated or self.replay

    def draft_size(self) -> int:
        """Draft tokens to propose for the next decode step, within what may still be
        generated and the context (0 without a drafter, or while it pauses)."""
        if self.drafter is None:
            return 0
        room = min(
            self.params.max_new_tokens - len(self.generated) - 1,
            self.context_room - self.position - 2,
        )
        return max(0, min(self.drafter.k(), room))

    def _draft(self) -> list[int]:
        """The draft for the next decode step: the draft model's (`proposed`, set by the
        coordinator before the step is built), else prompt lookup's."""
        if self.proposed is not None:
            draft, self.proposed = self.proposed, None
            return draft
        k = self.draft_size()
        if k < 1 or self.drafter is None:
            return []
        context = [*self.prompt, *self.generated]
        return speculation.propose(context, k, ngram_min=self.drafter.min_match())

    def next_step(self, budget: TokenBudget | None = None) -> tuple[Step, list[int]] | None:
        """The sequence's next step and its token ids; a prefill takes at most what
        `budget` allows (None: the whole prompt; a return of None: nothing this time)."""
        if not self.prefilling:
            draft = self._draft()
            self.drafted = len(draft)
            rollback, self.rollback = self.rollback, False
            step = Step(self.id, self.position, 1 + len(draft), draft=tuple(draft))
            return replace(step, rollback=rollback), [self.generated[-1], *draft]
        if not self.generated:
            tokens, sampling = self.prompt, self.params.to_message(self.prompt)
        else:  # one prefill of everything so far; the prompt is not rescored
            tokens = [*self.prompt, *self.generated]
            sampling = replace(self.params, prompt_logprobs=False).to_message(self.prompt)
        start = self.prefill_sent
        left = len(tokens) - start
        count = left
        if budget is not None and prefill.chunkable(bool(sampling.prompt_token_ids)):
            count = budget.take(left)
        if count == 0:
            return None
        end = start + count
        partial = end < len(tokens)
        self.prefill_sent = end if partial else 0
        if not partial:
            self.replay = False
        step = Step(self.id, start, count, sampling if start == 0 else None, partial=partial)
        return step, tokens[start:end]


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
    resume_timeout_s: float = 60.0
    """How long a parked sequence waits for every stage to be ready again before it fails:
    long enough for a killed stage process to be restarted and load a small slice (a few
    seconds under `llmpipe serve`, tens of seconds for a pod); 0 fails at once."""
    max_resumes: int = 5
    """Replays one sequence may take: a failure that comes back on every replay (a bug,
    not a lost stage) fails the request instead of looping."""
    prefill_chunk_tokens: int = 0
    """Prompt tokens per prefill chunk (`llmpipe_stage.prefill`); 0: a prompt in one step."""
    prefill_tokens_in_flight: int | None = None
    """Token throttling: the most prompt tokens in flight at once (`prefill.in_flight_limit`;
    None: two chunks per stage; 0: no bound)."""
    speculation: str = "off"
    """`ngram`: prompt-lookup drafts verified by the pipeline (`llmpipe_stage.speculation`);
    `auto`: the same for greedy requests only; `draft`: the draft model's
    (`llmpipe_stage.draft`, the coordinator's `draft_model`)."""
    max_draft_tokens: int = DEFAULT_MAX_DRAFT
    """The most draft tokens one step verifies (k is adaptive below it)."""


ChainReady = Callable[[], Awaitable[tuple[bool, str]]]
"""Whether every other stage is ready, and why not (`peers.Peers.readiness`)."""


async def _alone() -> tuple[bool, str]:
    return True, "one stage"


ChainLost = Callable[[], Awaitable[str | None]]
"""Why a stage of the chain is gone (refuses connections, or restarted), or None
(`peers.Peers.lost`)."""


async def _nothing_lost() -> str | None:
    return None


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
        chain_ready: ChainReady = _alone,
        chain_lost: ChainLost = _nothing_lost,
        draft_model: DraftModel | None = None,
    ) -> None:
        if settings.speculation == "draft" and draft_model is None:
            raise ValueError("speculation 'draft' needs a draft model")
        self.settings = settings
        self.draft_model = draft_model  # used only in the compute thread
        self.runtime = runtime
        self.executor = executor
        self.metrics = metrics
        self.forward = forward  # None when the pipeline has one stage
        self.release_remote = release_remote
        self.chain_ready = chain_ready
        self.chain_lost = chain_lost
        self.sequences: dict[int, Sequence] = {}  # id -> sequence, for those in the ring
        self.parked: set[Sequence] = set()  # waiting for a healthy chain
        self._recovery: asyncio.Task[None] | None = None
        self.accepting = True  # False once stage 0 drains (SIGTERM): new sequences refused
        self.ready: asyncio.Queue[Sequence] = asyncio.Queue()
        self.throttled: list[Sequence] = []  # prefills waiting for prompt tokens in flight
        self.prefill_in_flight = 0  # prompt tokens sent that the last stage has not run
        self.in_flight_limit = prefill.in_flight_limit(
            settings.prefill_tokens_in_flight,
            chunk=settings.prefill_chunk_tokens,
            num_stages=settings.num_stages,
        )
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
        if not self.accepting:
            raise PipelineError("stage 0 is shutting down (draining); retry the request")
        sequence = Sequence(next(self._ids), list(prompt), params, scores=scores)
        if self._speculates(params):
            sequence.drafter = AdaptiveDraft(max_k=self.settings.max_draft_tokens)
            sequence.context_room = self.settings.context_limit
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

    def _speculates(self, params: SamplingParams) -> bool:
        """Drafts for greedy and sampled requests (the last stage verifies a sampled one by
        the accept/reject rule, `llmpipe_stage.sampling`) that ask for no log-probabilities
        (a draft's tokens come back without them); under `auto` for greedy ones only (the
        measured case: docs/benchmarks.md)."""
        mode = self.settings.speculation
        return (
            (mode in ("ngram", "draft") or (mode == "auto" and params.temperature == 0))
            and self.settings.max_draft_tokens > 0
            and not params.logprobs
        )

    async def _admit(self, sequence: Sequence) -> None:
        self.waiting += 1
        self.metrics.queue_depth.set(self.waiting)
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
            self.metrics.queue_depth.set(self.waiting)
        sequence.admitted = True
        if self.parked:  # the chain is down: wait with the others
            self._park([sequence], "the pipeline is recovering", now=time.monotonic())
        else:
            self.sequences[sequence.id] = sequence
            self.ready.put_nowait(sequence)
        self._count_in_flight()

    def _count_in_flight(self) -> None:
        self.metrics.in_flight.set(len(self.sequences) + len(self.parked))
        self.metrics.paused.set(len(self.parked))

    def _finish(self, sequence: Sequence) -> None:
        if not sequence.admitted or sequence.closed:
            return
        sequence.closed = sequence.finished = True
        in_ring = self.sequences.pop(sequence.id, None) is not None
        self.parked.discard(sequence)
        self._settle(sequence)
        self.slots.release()
        self._count_in_flight()
        self.metrics.requests.labels(outcome=sequence.outcome).inc()
        if in_ring:  # a parked sequence's caches were freed when it was parked
            self.background.spawn(self._release_everywhere([sequence.id]))

    async def _release_everywhere(self, ids: list[int]) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, self._release_measured, ids)
        await self.release_remote(ids)

    def _release_measured(self, ids: list[int]) -> None:
        self.runtime.release(ids)
        if self.draft_model is not None:
            self.draft_model.release(ids)
        self.metrics.measure_caches(self.runtime)

    # -- ring events (from the server) -----------------------------------------------------
    def progressing(self, *, within_s: float) -> bool:
        """Whether a token came back around the ring in the last `within_s` seconds, with
        no failure reported since."""
        return (
            time.monotonic() - self.last_token_at < within_s
            and self.last_token_at > self.last_failure_at
        )

    @property
    def recovering(self) -> bool:
        """Whether sequences are parked, waiting for the chain to be healthy again."""
        return bool(self.parked)

    def on_tokens(self, sequence_ids: list[int], sampled: Sampled) -> None:
        now = time.monotonic()
        self.last_token_at = now
        self.metrics.count_tokens(len(sampled.tokens))
        for sid, length in sampled.chunks:
            self._chunk_ran(sid, length)
        groups = sampled.per_sequence()
        firsts = wire.token_offsets([Step(0, 0, len(g)) for g in groups])
        for sid, tokens, first in zip(sequence_ids, groups, firsts[:-1], strict=True):
            sequence = self.sequences.get(sid)
            if sequence is None or sequence.finished:
                continue  # cancelled while its step was in the ring
            self._settle(sequence)  # its last chunk ran, so every earlier one did
            if sequence.drafted:
                self._accepted(sequence, len(tokens) - 1)
            for row, token in enumerate(tokens, start=first):
                if sequence.finished:
                    break  # done before the end of an accepted draft: the rest is dropped
                self._token(sequence, token, row, sampled, now=now)
            if not sequence.finished:
                self.ready.put_nowait(sequence)

    # -- token throttling (`llmpipe_stage.prefill`) ----------------------------------------
    def _chunk_ran(self, sequence_id: int, length: int) -> None:
        """The last stage ran a partial chunk of this sequence: its tokens left the ring."""
        sequence = self.sequences.get(sequence_id)
        if sequence is not None:  # else settled when it left the ring
            self._out(sequence, min(length, sequence.prefill_out))

    def _settle(self, sequence: Sequence) -> None:
        """None of the sequence's prompt tokens are in flight any more."""
        self._out(sequence, sequence.prefill_out)

    def _out(self, sequence: Sequence, tokens: int) -> None:
        if tokens <= 0:
            return
        sequence.prefill_out -= tokens
        self.prefill_in_flight -= tokens
        self.metrics.prefill_in_flight.set(self.prefill_in_flight)
        waiting, self.throttled = self.throttled, []  # room again: let them try
        for entry in waiting:
            self.ready.put_nowait(entry)

    def _accepted(self, sequence: Sequence, accepted: int) -> None:
        """A verified draft came back: `accepted` of its tokens were the model's own."""
        drafted, sequence.drafted = sequence.drafted, 0
        sequence.rollback = accepted < drafted
        if sequence.drafter is not None:
            sequence.drafter.update(drafted, accepted)
        self.metrics.draft_tokens.inc(drafted)
        self.metrics.accepted_tokens.inc(accepted)

    def _token(
        self, sequence: Sequence, token: int, row: int, sampled: Sampled, *, now: float
    ) -> None:
        """One token of a sequence, in order: scores, metrics, its client, the end."""
        sid = sequence.id
        if sequence.scores is not None:
            if sampled.logprobs is not None:
                sequence.scores.tokens.append(sampled.logprobs[row])
            if sampled.alternatives is not None:
                sequence.scores.alternatives.append(sampled.alternatives[row])
            if sid in sampled.prompt_logprobs:
                sequence.scores.prompt = sampled.prompt_logprobs[sid]
            if sid in sampled.prompt_alternatives:
                sequence.scores.prompt_alternatives = sampled.prompt_alternatives[sid]
        if not sequence.generated:
            self.metrics.ttft.observe(now - sequence.created)
        if sequence.paused_since is not None:
            self.metrics.pause.observe(now - sequence.paused_since)
            self.metrics.resumed.inc()
            sequence.paused_since = None
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

    def on_failure(self, sequence_ids: list[int], reason: str) -> None:
        """A stage failed these sequences: the chain is broken under every sequence in the
        ring (a stage that died held all their caches), so all of them are parked.
        Failures of ids no longer in the ring (parked or freed already) change nothing."""
        live = [sid for sid in sequence_ids if sid in self.sequences]
        if not any(not self.sequences[sid].finished for sid in live):
            return
        now = self.last_failure_at = time.monotonic()
        log.warning("stage 0: pausing %d sequences: %s", len(self.sequences), reason)
        self._park([s for s in self.sequences.values() if not s.finished], reason, now=now)

    # -- parking and resuming --------------------------------------------------------------
    def _park(self, batch: list[Sequence], reason: str, *, now: float) -> None:
        """Take these sequences out of the ring, free their caches everywhere, and make
        sure a recovery task is waiting for the chain."""
        for sequence in batch:
            self.sequences.pop(sequence.id, None)
            sequence.step_sent_at = None
            sequence.replay = False
            sequence.prefill_sent = 0
            sequence.drafted = 0  # a draft in flight is lost with the caches
            sequence.rollback = False
            sequence.proposed = None
            self._settle(sequence)
            if sequence.paused_since is None:
                sequence.paused_since = now
            sequence.pause_reason = reason
            self.parked.add(sequence)
        kept = []  # the ready queue's entries of parked sequences are stale now
        while not self.ready.empty():
            entry = self.ready.get_nowait()
            if self.sequences.get(entry.id) is entry:
                kept.append(entry)
        for entry in kept:
            self.ready.put_nowait(entry)
        self.throttled = [s for s in self.throttled if self.sequences.get(s.id) is s]
        self._count_in_flight()
        self.background.spawn(self._release_everywhere([s.id for s in batch]))
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.ensure_future(self._recover())

    async def _recover(self) -> None:
        """Until nothing is parked: fail what waited past the bound, and once every stage
        is ready, replay the rest into the chain."""
        while self.parked:
            self._fail_expired(now=time.monotonic())
            if not self.parked:
                return
            ready, why = await self.chain_ready()
            if ready:
                self._replay(list(self.parked))
                return
            for sequence in self.parked:
                sequence.pause_reason = why
            await asyncio.sleep(RESUME_POLL_S)

    def _fail_expired(self, *, now: float) -> None:
        bound = self.settings.resume_timeout_s
        for sequence in list(self.parked):
            paused = sequence.paused_since
            if paused is None or now - paused < bound:
                continue
            message = sequence.pause_reason
            if bound > 0:
                message = f"{message}; no healthy pipeline came back within {bound:g} s"
            self._fail_parked(sequence, message)

    def _fail_parked(self, sequence: Sequence, message: str) -> None:
        self.parked.discard(sequence)
        sequence.finished = True
        sequence.outcome = "failed"
        self.metrics.resume_failures.inc()
        sequence.events.put_nowait(PipelineError(message))
        self._count_in_flight()

    def _replay(self, batch: list[Sequence]) -> None:
        """Back into the ring under fresh ids (the old ones were released everywhere)."""
        log.info("stage 0: every stage is ready; resuming %d sequences", len(batch))
        for sequence in batch:
            if sequence.resumes >= self.settings.max_resumes:
                self._fail_parked(
                    sequence,
                    f"{sequence.pause_reason} (still failing after {sequence.resumes} resumes)",
                )
                continue
            self.parked.discard(sequence)
            sequence.resumes += 1
            sequence.id = next(self._ids)
            sequence.replay = True
            self.sequences[sequence.id] = sequence
            self.ready.put_nowait(sequence)
        self._count_in_flight()

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

    async def _propose(self, batch: list[Sequence]) -> list[Sequence]:
        """The draft model's proposals for the decode steps of this micro-batch, computed
        in the compute thread; returns the batch without what ended meanwhile."""
        asks = []
        for sequence in batch:
            if sequence.drafter is None or sequence.prefilling:
                continue
            k = sequence.draft_size()
            sequence.proposed = []
            if k > 0:
                asks.append((sequence, sequence.id, [*sequence.prompt, *sequence.generated], k))
        if not asks:
            return batch
        loop = asyncio.get_running_loop()
        work = [(sid, context, k) for _, sid, context, k in asks]
        try:
            drafts = await loop.run_in_executor(self.executor, self._draft_all, work)
        except Exception:  # a drafter failure costs the draft, never the request
            log.exception("stage 0: the draft model failed; decoding these steps plainly")
            drafts = [[] for _ in asks]
        for (sequence, sid, _, _), draft in zip(asks, drafts, strict=True):
            if sequence.id == sid:  # else parked and replayed meanwhile: no draft
                sequence.proposed = draft
        return [s for s in batch if not s.finished and self.sequences.get(s.id) is s]

    def _draft_all(self, work: list[tuple[int, list[int], int]]) -> list[list[int]]:
        assert self.draft_model is not None
        return [self.draft_model.propose(sid, context, k) for sid, context, k in work]

    async def _process(self, batch: list[Sequence]) -> None:
        if self.draft_model is not None and self.settings.speculation == "draft":
            batch = await self._propose(batch)
        steps: list[Step] = []
        token_ids: list[int] = []
        budget = self._budget()
        later: list[Sequence] = []  # prefills past this micro-batch's token budget
        for sequence in batch:
            prefilling = sequence.prefilling
            next_step = sequence.next_step(budget)
            if next_step is None:
                if budget is not None and budget.throttled:  # back when tokens come out
                    self.throttled.append(sequence)
                    self.metrics.prefill_throttled.inc()
                else:
                    later.append(sequence)
                continue
            step, ids = next_step
            if prefilling and (step.partial or step.position > 0):  # a cut prompt's chunk
                self.metrics.prefill_chunks.inc()
            if prefilling and self.in_flight_limit is not None:
                sequence.prefill_out += step.length
                self.prefill_in_flight += step.length
                self.metrics.prefill_in_flight.set(self.prefill_in_flight)
            steps.append(step)
            token_ids.extend(ids)
            sequence.step_sent_at = time.monotonic()
        for sequence in later:
            self.ready.put_nowait(sequence)
        if not steps:
            return
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
            self.on_tokens([s.sequence_id for s in sampled_steps(steps)], result)
        elif self.forward is not None:
            self.background.spawn(self.forward(steps, result))
        self._chunks_sent(steps)

    def _budget(self) -> TokenBudget | None:
        chunk = self.settings.prefill_chunk_tokens
        if chunk <= 0:
            return None
        if self.in_flight_limit is None:
            return TokenBudget(chunk)
        room = max(0, self.in_flight_limit - self.prefill_in_flight)
        return TokenBudget(chunk, room=room, idle=self.prefill_in_flight == 0)

    def _chunks_sent(self, steps: list[Step]) -> None:
        """A sequence whose chunk just left is ready for its next one at once: stage 0
        computes chunk i + 1 while stage 1 runs chunk i."""
        for step in steps:
            if not step.partial:
                continue
            sequence = self.sequences.get(step.sequence_id)
            if sequence is not None and not sequence.finished:
                self.ready.put_nowait(sequence)

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
                continue
            late = [
                s.id
                for s in self.sequences.values()
                if s.step_sent_at is not None and now - s.step_sent_at > LATE_STEP_S
            ]
            if late:
                reason = await self.chain_lost()
                if reason is not None:
                    self.on_failure(late, reason)
