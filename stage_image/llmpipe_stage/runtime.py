"""Computation on one stage's layers slice, with a KV cache per sequence.

`StageRuntime.run` takes a micro-batch of steps (hidden states packed [tokens, hidden]) and
returns the slice's output packed the same way: decode steps (one token each) of many
sequences run as one batch, each over its own cache (padded to the longest and masked);
prompt steps run as one batch per (position, length), so equal-length prompts need no
padding. Stage 0 embeds token ids first; the last stage
applies the final norm and head and samples. The runtime is synchronous and single-threaded:
the server calls it from one worker thread, so caches need no locks. No I/O here.

On a GPU stage the slice and every KV cache live in device memory: `run` takes hidden
states from the host (or, on stage 0, the device tensor `embed` made), and hands its
output back in page-locked host memory (`devices.to_host`), which the wire encoder reads;
the head's logits come back to the host as float32 for sampling.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import time
from dataclasses import dataclass, field

import torch

from llmpipe_stage import decode, devices, sampling, wire
from llmpipe_stage.config import QUANTIZATIONS
from llmpipe_stage.loading import StageSlice
from llmpipe_stage.proto import stage_pb2
from llmpipe_stage.wire import Sampled, Step


class StepError(ValueError):
    """A step that does not fit this stage's caches (wrong position, context exceeded)."""


class SequenceCache:
    """One sequence on this stage: its slot in the stage's `SlotPool` and its length."""

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.length = 0  # tokens cached in every layer (committed after a full pass)
        self.last_used = time.monotonic()


class SlotPool:
    """The stage's KV cache: keys and values of every held sequence, preallocated.

    keys, values: [layers, slots, kv_heads, context, head_dim], one slot per sequence. A
    step writes its new keys in place and attention reads a view (a contiguous run of slots)
    or one gather, so the hot path neither grows nor re-stacks caches. The buffers come from
    `torch.empty`: pages are committed as positions are written, so resident memory follows
    the tokens cached, not the reservation. A batch of unequal lengths reads every slot up to
    the longest (masked); `readable` zeroes what no sequence wrote yet, once per slot
    (a high-water mark), so masked garbage can never be nan. Slots run out: the pool doubles.
    """

    ZERO_CHUNK = 256
    """Positions zeroed at once when a slot's high-water mark moves."""

    def __init__(
        self,
        *,
        layers: int,
        kv_heads: int,
        head_dim: int,
        context: int,
        dtype: torch.dtype,
        device: torch.device | None = None,
    ) -> None:
        self.shape = (layers, 0, kv_heads, context, head_dim)
        self.dtype = dtype
        self.device = device
        self.keys = torch.empty(self.shape, dtype=dtype, device=device)
        self.values = torch.empty(self.shape, dtype=dtype, device=device)
        self.finite: list[int] = []  # per slot: positions [0, finite) hold finite values
        self.free: list[int] = []

    @property
    def slots(self) -> int:
        return self.keys.shape[1]

    def token_bytes(self) -> int:
        """Bytes one cached token takes in this stage (keys and values, every layer)."""
        layers, _, kv_heads, _, head_dim = self.shape
        return 2 * layers * kv_heads * head_dim * self.keys.element_size()

    def take(self) -> int:
        if not self.free:
            self._grow(max(1, self.slots))
        self.free.sort()
        return self.free.pop(0)

    def give_back(self, slot: int) -> None:
        self.free.append(slot)

    def reserve(self, slots: int) -> None:
        if slots > self.slots:
            self._grow(slots - self.slots)

    def _grow(self, extra: int) -> None:
        old = self.slots
        layers, _, kv_heads, context, head_dim = self.shape
        shape = (layers, old + extra, kv_heads, context, head_dim)
        keys = torch.empty(shape, dtype=self.dtype, device=self.device)
        values = torch.empty(shape, dtype=self.dtype, device=self.device)
        for slot, finite in enumerate(self.finite):  # copy only what was ever written
            keys[:, slot, :, :finite] = self.keys[:, slot, :, :finite]
            values[:, slot, :, :finite] = self.values[:, slot, :, :finite]
        self.keys, self.values = keys, values
        self.finite += [0] * extra
        self.free += range(old, old + extra)

    def readable(self, slots: list[int], length: int) -> None:
        """Make positions [0, length) of these slots finite (zeroing the unwritten ones)."""
        for slot in slots:
            if self.finite[slot] < length:
                end = min(self.shape[3], -(-length // self.ZERO_CHUNK) * self.ZERO_CHUNK)
                self.keys[:, slot, :, self.finite[slot] : end].zero_()
                self.values[:, slot, :, self.finite[slot] : end].zero_()
                self.finite[slot] = end

    def wrote(self, slot: int, end: int) -> None:
        self.finite[slot] = max(self.finite[slot], end)

    def read(self, layer: int, slots: list[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [batch, kv_heads, length, head_dim] of these slots: a view when
        the slots are one ascending run, else one gather."""
        first = slots[0]
        if slots == list(range(first, first + len(slots))):
            end = first + len(slots)
            return (
                self.keys[layer, first:end, :, :length],
                self.values[layer, first:end, :, :length],
            )
        index = torch.tensor(slots, device=self.keys.device)
        return self.keys[layer, index, :, :length], self.values[layer, index, :, :length]


class BatchCache:
    """Stands in for a transformers `Cache` during one prompt forward over several sequences.

    The attention modules call `update(key, value, layer_idx)`; each sequence's new keys go
    into its slot and the batch gets every sequence's keys so far (padded to the longest,
    masked). Prompts from position 0 get their own new keys back: nothing is read.
    """

    is_compileable = False

    def __init__(self, pool: SlotPool, caches: list[SequenceCache], layer_start: int) -> None:
        self.pool = pool
        self.caches = caches
        self.layer_start = layer_start
        self.slots = [cache.slot for cache in caches]
        self.past = [cache.length for cache in caches]

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: object = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states, value_states: [batch, kv_heads, new, head_dim]
        layer = layer_idx - self.layer_start
        new = key_states.shape[2]
        for row, (slot, past) in enumerate(zip(self.slots, self.past, strict=True)):
            self.pool.keys[layer, slot, :, past : past + new] = key_states[row]
            self.pool.values[layer, slot, :, past : past + new] = value_states[row]
        if max(self.past) == 0:
            return key_states, value_states
        return self.pool.read(layer, self.slots, max(self.past) + new)


def give_freed_memory_back() -> None:
    """Return the heap that loading freed to the kernel (glibc's malloc_trim). Fusing and
    quantizing the weights frees many tensors of a few MB, which glibc keeps in its heap
    rather than unmapping: without this an int8 stage kept ~800 MB it no longer used."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def attention_mask(
    past: list[int], new: int, *, dtype: torch.dtype, device: torch.device | None = None
) -> torch.Tensor | None:
    """Additive mask [batch, 1, new, longest]: query j of sequence b sees keys < past[b]+j+1.

    None when the attention module's own causal handling is exact: steps with equal pasts
    that are either all empty (prompts of equal length: plain causal attention) or all
    single-token (each query sees every cached key).
    """
    if len(set(past)) == 1 and (past[0] == 0 or new == 1):
        return None
    longest = max(past) + new
    key_pos = torch.arange(longest)[None, None, :]  # [1, 1, longest]
    limit = torch.tensor(past)[:, None, None] + torch.arange(new)[None, :, None] + 1
    allowed = key_pos < limit  # [batch, new, longest]
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None].to(device) if device is not None else mask[:, None]


@dataclass
class Sampler:
    """How the last stage picks a sequence's tokens; greedy when temperature is 0."""

    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator = field(default_factory=torch.Generator)
    logprobs: bool = False
    """Report each sampled token's log-probability."""
    prompt_targets: tuple[int, ...] = ()
    """Prompt tokens 1..n-1 to score on the first step (echo with logprobs)."""
    top: int = 0
    """With logprobs: the most likely tokens to report at each scored position (0-20)."""

    @classmethod
    def from_message(cls, message: stage_pb2.Sampling | None) -> Sampler:
        if message is None:
            return cls()
        generator = torch.Generator()
        if message.has_seed:
            generator.manual_seed(message.seed)
        else:
            generator.seed()
        top_p = message.top_p if 0.0 <= message.top_p <= 1.0 else 1.0
        temperature = message.temperature if math.isfinite(message.temperature) else 0.0
        return cls(
            temperature=max(0.0, temperature),
            top_p=top_p,
            generator=generator,
            logprobs=message.logprobs,
            prompt_targets=tuple(message.prompt_token_ids),
            top=min(MAX_TOP_LOGPROBS, message.top_logprobs) if message.logprobs else 0,
        )

    def pick(self, logits: torch.Tensor) -> int:
        """logits: [vocab] (float32): the argmax when greedy, else a draw from
        `sampling.probabilities` (temperature, then top_p)."""
        if self.temperature == 0.0:
            return int(torch.argmax(logits).item())
        return sampling.draw(self.probabilities(logits), self.generator)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: [vocab] -> the distribution [vocab] this sampler draws from (temperature > 0)."""
        return sampling.probabilities(logits, temperature=self.temperature, top_p=self.top_p)


MAX_TOP_LOGPROBS = 20
"""The most alternatives a position reports (OpenAI's bound on chat's top_logprobs)."""


def top_alternatives(log_probs: torch.Tensor, count: int) -> list[wire.Alternatives]:
    """log_probs [rows, vocab] -> each row's `count` most likely (token, log-probability),
    most likely first; ties go to the lower token id (torch.topk's order is not stable)."""
    if count <= 0:
        return [[] for _ in range(log_probs.shape[0])]
    count = min(count, log_probs.shape[-1])
    values, ids = torch.topk(log_probs, count, dim=-1, sorted=True)
    out = []
    for row_values, row_ids in zip(values.tolist(), ids.tolist(), strict=True):
        pairs = sorted(zip(row_ids, row_values, strict=True), key=lambda p: (-p[1], p[0]))
        out.append([(int(token), float(score)) for token, score in pairs])
    return out


PROMPT_SCORE_CHUNK = 256
"""Prompt positions scored per head call: bounds the logits held at once (256 x vocab)."""


class StageRuntime:
    """A stage's layers slice plus one KV cache (and, on the last stage, a sampler) per sequence."""

    def __init__(
        self,
        stage: StageSlice,
        *,
        context_limit: int,
        max_sequences: int = 16,
        quantization: str = "none",
        fused: list[decode.FusedLayer] | None = None,
    ) -> None:
        """`fused`: the slice's layers already fused by a `decode.Fuser` while loading
        (`server.load_runtime`); without it they are fused here."""
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization {quantization!r} is not one of {QUANTIZATIONS}")
        self.stage = stage
        self.context_limit = context_limit
        self.quantization = quantization
        self.caches: dict[int, SequenceCache] = {}
        self.samplers: dict[int, Sampler] = {}
        config = stage.config
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        if fused is None:
            fuser = decode.Fuser(quantize=quantization, pack_for=max_sequences)
            for layer in stage.layers:
                fuser(layer)
            fused = fuser.layers
        self.fused = fused
        self.head: decode.Projection | None = None
        if stage.head_weight is not None:
            tied = (
                stage.embed is not None
                and stage.head_weight.data_ptr() == stage.embed.weight.data_ptr()
            )
            self.head = decode.projection(
                [stage.head_weight],
                [None],
                quantize=quantization,
                dtype=stage.dtype,
                pack_for=0 if tied else max_sequences,  # packing a tied head would copy it
            )
        head_dim = self.fused[0].head_dim if self.fused else 1
        self.pool = SlotPool(
            layers=len(self.fused),
            kv_heads=kv_heads,
            head_dim=head_dim,
            context=context_limit,
            dtype=stage.dtype,
            device=stage.device,
        )
        self.pool.reserve(max_sequences)
        give_freed_memory_back()

    def weight_bytes(self) -> int:
        """Bytes of the weights this runtime computes with (after fusing and quantizing)."""
        total = sum(p.nbytes() for f in self.fused for p in (f.qkv, f.out, f.gate_up, f.down))
        norms = [m for f in self.fused for m in (f.input_norm, f.post_norm)]
        if self.stage.norm is not None:
            norms.append(self.stage.norm)
        total += sum(t.numel() * t.element_size() for m in norms for t in m.parameters())
        if self.head is not None:
            total += self.head.nbytes()
        if self.stage.embed is not None:
            weight = self.stage.embed.weight
            packed = isinstance(self.head, decode.PackedProjection)
            if self.head is None or packed or weight.data_ptr() != self.head.weight.data_ptr():
                total += weight.numel() * weight.element_size()
        return total

    # -- stage 0 ---------------------------------------------------------------------------
    def embed(self, token_ids: list[int]) -> torch.Tensor:
        """Packed token ids -> hidden [tokens, hidden_size] (stage 0 only)."""
        if self.stage.embed is None:
            raise StepError("this stage holds no embeddings")
        ids = torch.tensor(token_ids, dtype=torch.long).to(self.stage.device)
        with torch.inference_mode():
            hidden: torch.Tensor = self.stage.embed(ids)
        return hidden

    # -- every stage -----------------------------------------------------------------------
    def run(self, steps: list[Step], hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [sum(step.length), hidden_size] -> same shape after this stage's layers,
        in host memory (page-locked on a GPU stage)."""
        for step in steps:
            self._roll_back(step)
            self._check(step)
        hidden = hidden.to(self.stage.device, non_blocking=True)
        offsets = wire.token_offsets(steps)
        out = torch.empty_like(hidden)
        # Decode steps (one token) run as one batch; prompt steps of equal position and
        # length run as one batch too (no padding, no mask), like `generate`'s prefill.
        # Decode rows go in slot order, so a run of slots is read as one view.
        one_token = sorted(
            (i for i, s in enumerate(steps) if s.length == 1),
            key=lambda i: self._slot_order(steps[i]),
        )
        groups = [one_token] if one_token else []
        prompts: dict[tuple[int, int], list[int]] = {}
        for i, s in enumerate(steps):
            if s.length > 1:
                prompts.setdefault((s.position, s.length), []).append(i)
        groups += prompts.values()
        with torch.inference_mode():
            for group in groups:
                # chunk: [batch, new, hidden_size]
                chunk = torch.stack([hidden[offsets[i] : offsets[i + 1]] for i in group])
                result = self._forward([steps[i] for i in group], chunk)
                for row, i in enumerate(group):
                    out[offsets[i] : offsets[i + 1]] = result[row]
        return devices.to_host(out)

    def _forward(self, steps: list[Step], hidden: torch.Tensor) -> torch.Tensor:
        """hidden [batch, new, hidden_size]: a decode batch (new = 1) runs the fused decode
        step; prompts run through transformers' layers over the slot cache."""
        caches = [self._cache_for(step) for step in steps]
        past = [cache.length for cache in caches]
        slots = [cache.slot for cache in caches]
        new = hidden.shape[1]
        position_ids = torch.tensor(past)[:, None] + torch.arange(new)[None, :]  # [batch, new]
        position_ids = position_ids.to(hidden.device)
        cos, sin = self.stage.rotary(hidden, position_ids)  # [batch, new, head_dim] each
        if new == 1 and self.fused:
            out = decode.decode_layers(
                self.fused,
                hidden[:, 0],
                pool=self.pool,
                slots=slots,
                past=past,
                cos=cos[:, 0],
                sin=sin[:, 0],
            )[:, None]
        else:
            out = self._prompt_forward(caches, hidden, position_ids, (cos, sin))
        now = time.monotonic()
        for cache in caches:
            cache.length += new
            cache.last_used = now
        return out

    def _prompt_forward(
        self,
        caches: list[SequenceCache],
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        past = [cache.length for cache in caches]
        new = hidden.shape[1]
        if max(past) > 0:
            self.pool.readable([c.slot for c in caches], max(past) + new)
        mask = attention_mask(past, new, dtype=hidden.dtype, device=hidden.device)
        batch_cache = BatchCache(self.pool, caches, self.stage.layer_start)
        for layer in self.stage.layers:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=batch_cache,
                use_cache=True,
                position_embeddings=position_embeddings,
            )
        for cache in caches:
            self.pool.wrote(cache.slot, cache.length + new)
        return hidden

    def _slot_order(self, step: Step) -> int:
        cache = self.caches.get(step.sequence_id)
        return cache.slot if cache is not None else self.pool.slots + step.sequence_id

    def _roll_back(self, step: Step) -> None:
        """A step after rejected draft positions: the cache past `position` goes (setting
        the length back is enough: the next writes overwrite those keys and values)."""
        cache = self.caches.get(step.sequence_id)
        if step.rollback and cache is not None and step.position < cache.length:
            cache.length = step.position

    def _check(self, step: Step) -> None:
        """Raise StepError unless the step continues its sequence's cache exactly."""
        cache = self.caches.get(step.sequence_id)
        cached = 0 if cache is None else cache.length
        if step.position != cached:
            raise StepError(
                f"sequence {step.sequence_id}: step at position {step.position} "
                f"but {cached} tokens are cached here"
            )
        overflow = wire.context_overflow(step, self.context_limit)
        if overflow is not None:
            raise StepError(overflow)

    def _cache_for(self, step: Step) -> SequenceCache:
        cache = self.caches.get(step.sequence_id)
        if cache is None:
            cache = self.caches[step.sequence_id] = SequenceCache(self.pool.take())
            if self.stage.has_head:
                self.samplers[step.sequence_id] = Sampler.from_message(step.sampling)
        return cache

    # -- last stage ------------------------------------------------------------------------
    def sample(self, steps: list[Step], hidden: torch.Tensor) -> list[int]:
        """Final norm + head on each step's last token, then that sequence's sampler."""
        return self.sample_scored(steps, hidden).tokens

    def greedy(self, hidden: torch.Tensor) -> list[int]:
        """hidden [rows, hidden_size] -> each row's argmax token (the draft model's choice)."""
        with torch.inference_mode():
            chosen: list[int] = self._logits(hidden).argmax(dim=-1).tolist()
        return chosen

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [rows, hidden_size] -> float32 logits [rows, vocab], on the host."""
        if self.stage.norm is None or self.head is None:
            raise StepError("this stage holds no head")
        hidden = hidden.to(self.stage.device, non_blocking=True)
        logits: torch.Tensor = self.head(self.stage.norm(hidden))
        return logits.float().cpu()

    def sample_scored(self, steps: list[Step], hidden: torch.Tensor) -> Sampled:
        """`sample`, plus the log-probabilities the steps' sequences asked for. Partial
        prompt chunks are not sampled: the result covers `wire.sampled_steps(steps)`."""
        ends = [end - 1 for end in wire.token_offsets(steps)[1:]]  # each step's last token
        kept = [i for i, step in enumerate(steps) if not step.partial]
        if len(kept) != len(steps):
            steps, ends = [steps[i] for i in kept], [ends[i] for i in kept]
        if not steps:
            return Sampled([])
        if any(step.draft for step in steps):
            return self._sample_verifying(steps, ends, hidden)
        return self._sample_plain(steps, ends, hidden)

    def _sample_verifying(
        self, steps: list[Step], ends: list[int], hidden: torch.Tensor
    ) -> Sampled:
        """Steps of which some verify a draft: those get their accepted tokens plus one
        (`_verify`), the others their one token; `counts` says how many each."""
        plain = [i for i, step in enumerate(steps) if not step.draft]
        sampled = self._sample_plain([steps[i] for i in plain], [ends[i] for i in plain], hidden)
        by_step: dict[int, tuple[list[int], list[float]]] = {}
        top_by_step: dict[int, list[wire.Alternatives]] = {}
        for row, i in enumerate(plain):
            score = sampled.logprobs[row] if sampled.logprobs is not None else math.nan
            by_step[i] = ([sampled.tokens[row]], [score])
            if sampled.alternatives is not None:
                top_by_step[i] = [sampled.alternatives[row]]
        with torch.inference_mode():
            for i, step in enumerate(steps):
                if step.draft:
                    rows = hidden[ends[i] + 1 - step.length : ends[i] + 1]
                    tokens = self._verify(step, rows)
                    by_step[i] = (tokens, [math.nan] * len(tokens))
                    top_by_step[i] = [[] for _ in tokens]
        ordered = [by_step[i] for i in range(len(steps))]
        logprobs = None
        if sampled.logprobs is not None:
            logprobs = [score for _, scores in ordered for score in scores]
        alternatives = None
        if sampled.alternatives is not None:
            alternatives = [top for i in range(len(steps)) for top in top_by_step[i]]
        return Sampled(
            [token for tokens, _ in ordered for token in tokens],
            logprobs,
            sampled.prompt_logprobs,
            [len(tokens) for tokens, _ in ordered],
            alternatives=alternatives,
            prompt_alternatives=sampled.prompt_alternatives,
        )

    def _verify(self, step: Step, hidden: torch.Tensor) -> list[int]:
        """Verification of a draft. hidden: the step's rows [length, hidden_size], whose
        last k + 1 rows follow the last accepted token and the k draft tokens. Greedy: the
        model's choice after each is its argmax; the draft is accepted up to its first
        token that differs, and that choice (or, all accepted, the one after the draft) is
        the corrected token. Sampled: the accept/reject rule of speculative sampling over
        the sampler's own distributions (`sampling.accept_draft`; the drafter's q is a point
        mass on its token). The rejected positions are dropped from this stage's cache."""
        k = len(step.draft)
        logits = self._logits(hidden[-(k + 1) :])  # [k + 1, vocab]
        sampler = self.samplers.get(step.sequence_id, Sampler())
        if sampler.temperature == 0.0:
            choices = [int(token) for token in torch.argmax(logits, dim=-1).tolist()]
            accepted = 0
            while accepted < k and choices[accepted] == step.draft[accepted]:
                accepted += 1
            tokens = choices[: accepted + 1]
        else:
            probs = torch.stack([sampler.probabilities(row) for row in logits])  # [k + 1, vocab]
            tokens = sampling.accept_draft(probs, step.draft, sampler.generator)
            accepted = len(tokens) - 1
        cache = self.caches.get(step.sequence_id)
        if cache is not None:
            cache.length = step.position + step.length - (k - accepted)
        return tokens

    def _sample_plain(self, steps: list[Step], ends: list[int], hidden: torch.Tensor) -> Sampled:
        if not steps:
            return Sampled([])
        samplers = [self.samplers.get(step.sequence_id, Sampler()) for step in steps]
        with torch.inference_mode():
            logits = self._logits(hidden[ends])  # [batch, vocab]
            tokens = [sampler.pick(logits[row]) for row, sampler in enumerate(samplers)]
            logprobs = None
            alternatives = None
            if any(s.logprobs for s in samplers):
                norms = torch.logsumexp(logits, dim=-1)  # [batch]
                logprobs = [
                    float(logits[row, token] - norms[row]) if s.logprobs else math.nan
                    for row, (s, token) in enumerate(zip(samplers, tokens, strict=True))
                ]
                if any(s.top for s in samplers):
                    alternatives = [
                        top_alternatives((logits[row] - norms[row])[None], s.top)[0]
                        for row, s in enumerate(samplers)
                    ]
            prompts: dict[int, list[float]] = {}
            prompt_tops: dict[int, list[wire.Alternatives]] = {}
            for step, end, sampler in zip(steps, ends, samplers, strict=True):
                if sampler.prompt_targets and step.position == 0:
                    scores, tops = self._score_prompt(
                        hidden[end + 1 - step.length : end], sampler.prompt_targets, sampler.top
                    )
                    prompts[step.sequence_id] = scores
                    if sampler.top:
                        prompt_tops[step.sequence_id] = tops
        return Sampled(
            tokens, logprobs, prompts, alternatives=alternatives, prompt_alternatives=prompt_tops
        )

    def _score_prompt(
        self, hidden: torch.Tensor, targets: tuple[int, ...], top: int = 0
    ) -> tuple[list[float], list[wire.Alternatives]]:
        """log P(target[i] | prefix) from the prompt's hidden states [n - 1, hidden_size],
        and with `top` each position's most likely tokens, in chunks so a long prompt never
        holds [n, vocab] logits at once."""
        if hidden.shape[0] != len(targets):
            raise StepError(f"{len(targets)} prompt targets for {hidden.shape[0]} positions")
        target = torch.tensor(targets, dtype=torch.long)
        out: list[float] = []
        tops: list[wire.Alternatives] = []
        for start in range(0, len(targets), PROMPT_SCORE_CHUNK):
            logits = self._logits(hidden[start : start + PROMPT_SCORE_CHUNK])
            log_probs = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
            chosen = log_probs.gather(1, target[start : start + PROMPT_SCORE_CHUNK, None])[:, 0]
            out.extend(chosen.tolist())
            if top:
                tops.extend(top_alternatives(log_probs, top))
        return out, tops

    # -- cache lifetime --------------------------------------------------------------------
    def release(self, sequence_ids: list[int]) -> list[int]:
        """Free these sequences' caches; returns the ids that were held."""
        freed = []
        for sid in sequence_ids:
            cache = self.caches.pop(sid, None)
            if cache is not None:
                self.pool.give_back(cache.slot)
                freed.append(sid)
        for sid in sequence_ids:
            self.samplers.pop(sid, None)
        return freed

    def expired(self, idle_seconds: float) -> list[int]:
        """Sequences whose cache has not been used for `idle_seconds` (their owner is gone)."""
        cutoff = time.monotonic() - idle_seconds
        return [sid for sid, cache in self.caches.items() if cache.last_used < cutoff]

    def cache_bytes(self) -> int:
        """Bytes of keys and values the held sequences have cached."""
        return self.pool.token_bytes() * sum(cache.length for cache in self.caches.values())
