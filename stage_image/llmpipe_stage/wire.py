"""Tensor <-> wire bytes: raw little-endian data with dtype and shape, never pickled.

Pure conversions between torch tensors and `stage_pb2.Tensor` / `Activations` messages,
plus the validation a receiving stage runs before trusting a message. No I/O here.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from llmpipe_stage.proto import stage_pb2

DTYPES: dict[int, torch.dtype] = {
    stage_pb2.FLOAT32: torch.float32,
    stage_pb2.FLOAT16: torch.float16,
    stage_pb2.BFLOAT16: torch.bfloat16,
}
WIRE_DTYPES: dict[torch.dtype, Any] = {v: k for k, v in DTYPES.items()}
DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class WireError(ValueError):
    """A message that cannot be decoded; the RPC answers INVALID_ARGUMENT with this text."""


@dataclass(frozen=True)
class Step:
    """One sequence's tokens in a micro-batch: absolute positions [position, position + length)."""

    sequence_id: int
    position: int
    length: int
    sampling: stage_pb2.Sampling | None = None
    partial: bool = False
    """A prompt chunk other than the last: cached everywhere, sampled nowhere."""
    draft: tuple[int, ...] = ()
    """Speculative decoding: the step's last len(draft) tokens are a draft to verify."""
    rollback: bool = False
    """Drop the sequence's cached positions from `position` on first (rejected drafts)."""


def sampled_steps(steps: list[Step]) -> list[Step]:
    """The steps the last stage samples a token for (every one but partial prompt chunks)."""
    return [step for step in steps if not step.partial]


def token_offsets(steps: list[Step]) -> list[int]:
    """Where each step's tokens start in a packed micro-batch, and the total at the end:
    step i covers rows [offsets[i], offsets[i + 1]) of hidden [sum(length), hidden_size]."""
    offsets = [0]
    for step in steps:
        offsets.append(offsets[-1] + step.length)
    return offsets


def context_overflow(step: Step, context_limit: int) -> str | None:
    """Why the step does not fit the context limit (None: it fits)."""
    end = step.position + step.length
    if end <= context_limit:
        return None
    return f"sequence {step.sequence_id}: {end} tokens exceed the context limit of {context_limit}"


Alternatives = list[tuple[int, float]]
"""The most likely tokens at one position, (token id, log-probability), most likely first."""


@dataclass
class Sampled:
    """What the last stage returns for a micro-batch (the `Tokens` message, unpacked)."""

    tokens: list[int]
    logprobs: list[float] | None = None
    """Parallel to tokens when any sequence asked (NaN for the others)."""
    prompt_logprobs: dict[int, list[float]] = field(default_factory=dict)
    """sequence id -> log P(prompt[i] | prompt[:i]) for i >= 1 (first steps that asked)."""
    counts: list[int] | None = None
    """Tokens per sequence when a step verified a draft (tokens then holds sum(counts));
    None: one each."""
    chunks: list[tuple[int, int]] = field(default_factory=list)
    """(sequence id, length) of each partial prompt chunk the last stage ran in this
    micro-batch: no token comes back for them, only this acknowledgement."""
    alternatives: list[Alternatives] | None = None
    """Parallel to tokens when any sequence asked for top_logprobs (empty for the others)."""
    prompt_alternatives: dict[int, list[Alternatives]] = field(default_factory=dict)
    """sequence id -> the top tokens at each scored prompt position (parallel to its
    prompt_logprobs), for first steps that asked."""

    def per_sequence(self) -> list[list[int]]:
        """Each sequence's tokens, in order."""
        if self.counts is None:
            return [[token] for token in self.tokens]
        out, start = [], 0
        for count in self.counts:
            out.append(self.tokens[start : start + count])
            start += count
        return out


def encode_tokens(sequence_ids: list[int], sampled: Sampled) -> stage_pb2.Tokens:
    message = stage_pb2.Tokens(
        sequence_ids=sequence_ids,
        token_ids=sampled.tokens,
        logprobs=sampled.logprobs or [],
        counts=sampled.counts or [],
        chunk_sequence_ids=[sid for sid, _ in sampled.chunks],
        chunk_lengths=[length for _, length in sampled.chunks],
    )
    for sid, scores in sampled.prompt_logprobs.items():
        entry = message.prompt_logprobs.add(sequence_id=sid, logprobs=scores)
        for top in sampled.prompt_alternatives.get(sid, []):
            _add_alternatives(entry.alternatives, top)
    for top in sampled.alternatives or []:
        _add_alternatives(message.alternatives, top)
    return message


def _add_alternatives(field: Any, top: Alternatives) -> None:
    field.add(token_ids=[token for token, _ in top], logprobs=[score for _, score in top])


def _alternatives(entries: Any) -> list[Alternatives]:
    out = []
    for entry in entries:
        if len(entry.token_ids) != len(entry.logprobs):
            raise WireError(
                f"alternatives of {len(entry.token_ids)} tokens but {len(entry.logprobs)} "
                "log-probabilities"
            )
        out.append(list(zip(entry.token_ids, entry.logprobs, strict=True)))
    return out


def decode_tokens(message: stage_pb2.Tokens) -> tuple[list[int], Sampled]:
    """Validate and unpack sampled tokens; raise WireError naming what is wrong."""
    ids = list(message.sequence_ids)
    counts = list(message.counts) if message.counts else None
    if counts is not None:
        if len(counts) != len(ids) or min(counts) < 1:
            raise WireError(f"{len(ids)} sequence ids but token counts {counts}")
        if sum(counts) != len(message.token_ids):
            raise WireError(f"counts cover {sum(counts)} tokens, not {len(message.token_ids)}")
    elif len(ids) != len(message.token_ids):
        raise WireError(f"{len(ids)} sequence ids but {len(message.token_ids)} token ids")
    if message.logprobs and len(message.logprobs) != len(message.token_ids):
        raise WireError(f"{len(message.token_ids)} tokens but {len(message.logprobs)} logprobs")
    if len(message.chunk_sequence_ids) != len(message.chunk_lengths):
        raise WireError(
            f"{len(message.chunk_sequence_ids)} chunk sequence ids but "
            f"{len(message.chunk_lengths)} chunk lengths"
        )
    if message.alternatives and len(message.alternatives) != len(message.token_ids):
        raise WireError(
            f"{len(message.token_ids)} tokens but {len(message.alternatives)} alternatives"
        )
    prompts = {p.sequence_id: list(p.logprobs) for p in message.prompt_logprobs}
    prompt_alternatives = {}
    for p in message.prompt_logprobs:
        if p.alternatives:
            if len(p.alternatives) != len(p.logprobs):
                raise WireError(
                    f"sequence {p.sequence_id}: {len(p.logprobs)} prompt scores but "
                    f"{len(p.alternatives)} alternatives"
                )
            prompt_alternatives[p.sequence_id] = _alternatives(p.alternatives)
    logprobs = list(message.logprobs) if message.logprobs else None
    alternatives = _alternatives(message.alternatives) if message.alternatives else None
    chunks = list(zip(message.chunk_sequence_ids, message.chunk_lengths, strict=True))
    return ids, Sampled(
        list(message.token_ids),
        logprobs,
        prompts,
        counts,
        chunks,
        alternatives=alternatives,
        prompt_alternatives=prompt_alternatives,
    )


def encode_tensor(tensor: torch.Tensor) -> stage_pb2.Tensor:
    """Serialise a CPU tensor as raw little-endian bytes (one copy)."""
    if tensor.dtype not in WIRE_DTYPES:
        raise WireError(f"dtype {tensor.dtype} cannot go on the wire; use {list(DTYPE_NAMES)}")
    flat = tensor.detach().contiguous().reshape(-1)
    raw = flat.view(torch.uint8) if flat.numel() else flat.to(torch.uint8)
    data = raw.numpy().tobytes()
    if sys.byteorder != "little":  # pragma: no cover - every supported host is little-endian
        data = flat.numpy().byteswap().tobytes()
    return stage_pb2.Tensor(dtype=WIRE_DTYPES[tensor.dtype], shape=list(tensor.shape), data=data)


def decode_tensor(message: stage_pb2.Tensor) -> torch.Tensor:
    """Rebuild a tensor, checking that dtype, shape and byte length agree."""
    dtype = DTYPES.get(message.dtype)
    if dtype is None:
        raise WireError(f"unknown tensor dtype {message.dtype}")
    shape = list(message.shape)
    if any(d < 0 for d in shape):
        raise WireError(f"negative dimension in shape {shape}")
    numel = 1
    for d in shape:
        numel *= d
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(message.data) != numel * itemsize:
        raise WireError(
            f"tensor data is {len(message.data)} bytes but shape {shape} of {dtype} "
            f"needs {numel * itemsize}"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        # protobuf bytes are read-only; we clone below so the tensor owns writable memory.
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(message.data, dtype=torch.uint8)
    if sys.byteorder != "little":  # pragma: no cover
        raise WireError("big-endian hosts are not supported")
    return flat.view(dtype).reshape(shape).clone()


def encode_activations(
    steps: list[Step], hidden: torch.Tensor, *, sent_unix_ns: int = 0
) -> stage_pb2.Activations:
    """hidden: [sum(step.length), hidden_size], the steps' tokens packed in order."""
    message = stage_pb2.Activations(hidden=encode_tensor(hidden), sent_unix_ns=sent_unix_ns)
    for step in steps:
        out = message.steps.add(
            sequence_id=step.sequence_id,
            position=step.position,
            length=step.length,
            partial=step.partial,
            draft=step.draft,
            rollback=step.rollback,
        )
        if step.sampling is not None:
            out.sampling.CopyFrom(step.sampling)
    return message


def decode_activations(
    message: stage_pb2.Activations, *, hidden_size: int, dtype: torch.dtype
) -> tuple[list[Step], torch.Tensor]:
    """Validate and unpack a micro-batch (hidden states in `dtype`, whatever dtype the
    sender ran); raise WireError naming what is wrong."""
    if not message.steps:
        raise WireError("activations carry no sequence steps")
    hidden = decode_tensor(message.hidden)
    if hidden.dim() != 2 or hidden.shape[1] != hidden_size:
        raise WireError(f"hidden state shape {list(hidden.shape)} is not [tokens, {hidden_size}]")
    if hidden.dtype != dtype:
        # A neighbour on another device may run another dtype (a T4's float16 next to an
        # L4's bfloat16 under spec.model.dtype auto): take its states in ours.
        hidden = hidden.to(dtype)
    steps: list[Step] = []
    seen: set[int] = set()
    for raw in message.steps:
        if raw.length == 0:
            raise WireError(f"sequence {raw.sequence_id}: step covers no tokens")
        if raw.sequence_id in seen:
            raise WireError(f"sequence {raw.sequence_id} appears twice in one micro-batch")
        seen.add(raw.sequence_id)
        sampling = raw.sampling if raw.HasField("sampling") else None
        if len(raw.draft) >= raw.length:
            raise WireError(
                f"sequence {raw.sequence_id}: a draft of {len(raw.draft)} tokens "
                f"in a step of {raw.length}"
            )
        steps.append(
            Step(
                raw.sequence_id,
                raw.position,
                raw.length,
                sampling,
                raw.partial,
                tuple(raw.draft),
                raw.rollback,
            )
        )
    total = sum(s.length for s in steps)
    if total != hidden.shape[0]:
        raise WireError(f"steps cover {total} tokens but the hidden state has {hidden.shape[0]}")
    return steps, hidden
