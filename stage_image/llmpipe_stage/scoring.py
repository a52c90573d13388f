"""Log-probabilities on `/v1/completions`: the `logprobs` and `echo` fields (pure).

`logprobs: 0` returns the log-probability (under the model, before temperature and top-p)
of every generated token; with `echo: true` the prompt comes back in front of the text
and its tokens are scored too (the first has no log-probability), which is how a client
measures perplexity. Alternatives (`logprobs` > 0, OpenAI's top-k lists) are not computed;
asking for them is refused rather than answered with less than was asked.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class ScoringError(ValueError):
    """A logprobs/echo request the API refuses with HTTP 400; `param` names the field."""

    def __init__(self, message: str, *, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Scoring:
    logprobs: bool = False
    echo: bool = False


def parse_scoring(body: Mapping[str, Any], *, chat: bool, stream: bool) -> Scoring:
    """Read `logprobs` and `echo` from a completions request (chat: only refuse them)."""
    logprobs = body.get("logprobs")
    echo = body.get("echo", False)
    if chat:
        if logprobs not in (None, False):
            raise ScoringError("logprobs are not supported on chat completions", param="logprobs")
        return Scoring()
    if not isinstance(echo, bool):
        raise ScoringError(f"echo must be a boolean, got {echo!r}", param="echo")
    if logprobs is None:
        return Scoring(echo=echo)
    if isinstance(logprobs, bool) or not isinstance(logprobs, int) or logprobs < 0:
        raise ScoringError(
            f"logprobs must be a non-negative integer, got {logprobs!r}", param="logprobs"
        )
    if logprobs > 0:
        raise ScoringError(
            "only logprobs=0 is supported (the chosen tokens' log-probabilities, no alternatives)",
            param="logprobs",
        )
    if stream:
        raise ScoringError("logprobs are not supported with stream=true", param="logprobs")
    return Scoring(logprobs=True, echo=echo)


def _number(value: float) -> float | None:
    return None if math.isnan(value) else value


def logprobs_object(
    token_texts: list[str],
    *,
    prompt_scores: list[float] | None,
    token_scores: list[float],
    echo: bool,
) -> dict[str, Any]:
    """OpenAI's completions `logprobs` object. token_texts: each token's text, the prompt's
    first when echo; prompt_scores: log P(prompt[i] | prompt[:i]) for i >= 1."""
    scores: list[float | None] = []
    if echo:
        scores.append(None)
        scores.extend(_number(v) for v in (prompt_scores or []))
    scores.extend(_number(v) for v in token_scores)
    offsets = []
    position = 0
    for text in token_texts:
        offsets.append(position)
        position += len(text)
    return {
        "tokens": token_texts,
        "token_logprobs": scores,
        "top_logprobs": None,
        "text_offset": offsets,
    }
