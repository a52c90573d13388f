"""A generation as stage 0's coordinator takes it and the gateway submits it. Pure data.

`SamplingParams` (what to sample, how many tokens), `Scores` (the log-probabilities a
request asked for, filled in as tokens come back) and `PipelineError` (why the pipeline
cannot serve a sequence; the gateway answers 503). The gateway (`llmpipe_stage.gateway`)
and the coordinator (`llmpipe_stage.coordinator`) both import this module and nothing of
each other. No torch, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmpipe_stage.proto import stage_pb2


class PipelineError(RuntimeError):
    """The pipeline cannot serve this sequence (a stage is down, stuck or not ready).
    The gateway answers HTTP 503 with this text."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: bool = False
    """Return each sampled token's log-probability."""
    prompt_logprobs: bool = False
    """Score the prompt too (echo): its tokens travel to the last stage with the first step."""
    top_logprobs: int = 0
    """With logprobs: also the most likely tokens at each scored position (0-20)."""

    def to_message(self, prompt: list[int]) -> stage_pb2.Sampling:
        return stage_pb2.Sampling(
            temperature=self.temperature,
            top_p=self.top_p,
            has_seed=self.seed is not None,
            seed=self.seed or 0,
            logprobs=self.logprobs,
            prompt_token_ids=prompt[1:] if self.prompt_logprobs else [],
            top_logprobs=self.top_logprobs if self.logprobs else 0,
        )


@dataclass
class Scores:
    """Log-probabilities a request asked for, filled in as its tokens come back."""

    prompt: list[float] | None = None
    """log P(prompt[i] | prompt[:i]) for i >= 1, once the first token is back."""
    tokens: list[float] = field(default_factory=list)
    """Of each generated token."""
    alternatives: list[list[tuple[int, float]]] = field(default_factory=list)
    """With top_logprobs: the most likely (token, log-probability) at each generated
    position, most likely first."""
    prompt_alternatives: list[list[tuple[int, float]]] | None = None
    """With top_logprobs and echo: the same at prompt positions 1..n-1."""
