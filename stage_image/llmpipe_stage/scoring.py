"""Log-probabilities: completions' `logprobs` and `echo`, chat's `logprobs` (pure).

`logprobs: 0` on `/v1/completions` (and `logprobs: true` on `/v1/chat/completions`)
returns the log-probability (under the model, before temperature and top-p) of every
generated token; with completions' `echo: true` the prompt comes back in front of the
text and its tokens are scored too (the first has no log-probability), which is how a
client measures perplexity. Alternatives: completions' `logprobs: N` (N <= 5) lists the N
most likely tokens at each scored position, and the chosen one besides when it is not
among them (so up to N + 1, as OpenAI does); chat's `top_logprobs: N` (N <= 20) lists
exactly N. Log-probabilities are the model's, before temperature and top-p. Streamed,
each chunk carries the scores of the tokens that came with it; prompt scores (`echo` with
`logprobs`) come only with a whole reply.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MAX_COMPLETION_LOGPROBS = 5
"""OpenAI's bound on completions' `logprobs`."""
MAX_CHAT_TOP_LOGPROBS = 20
"""OpenAI's bound on chat's `top_logprobs`."""

Top = Sequence[tuple[str, float]]
"""One position's alternatives as shown: (token text, log-probability), most likely first."""


class ScoringError(ValueError):
    """A logprobs/echo request the API refuses with HTTP 400; `param` names the field."""

    def __init__(self, message: str, *, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Scoring:
    logprobs: bool = False
    echo: bool = False
    top: int = 0
    """Alternatives per scored position (completions' `logprobs`, chat's `top_logprobs`)."""


def parse_scoring(body: Mapping[str, Any], *, chat: bool, stream: bool) -> Scoring:
    """Read `logprobs` and `echo` (completions) or `logprobs` and `top_logprobs` (chat)."""
    if chat:
        return _parse_chat_scoring(body)
    logprobs = body.get("logprobs")
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise ScoringError(f"echo must be a boolean, got {echo!r}", param="echo")
    if logprobs is None:
        return Scoring(echo=echo)
    if (
        isinstance(logprobs, bool)
        or not isinstance(logprobs, int)
        or not 0 <= logprobs <= MAX_COMPLETION_LOGPROBS
    ):
        raise ScoringError(
            f"logprobs must be an integer in [0, {MAX_COMPLETION_LOGPROBS}], got {logprobs!r}",
            param="logprobs",
        )
    if stream and echo:
        raise ScoringError(
            "logprobs with echo are not supported with stream=true (the prompt's scores come "
            "with the whole reply only)",
            param="logprobs",
        )
    return Scoring(logprobs=True, echo=echo, top=logprobs)


def _parse_chat_scoring(body: Mapping[str, Any]) -> Scoring:
    """Chat: `logprobs` is a boolean; `top_logprobs` (0-20) only with it."""
    logprobs = body.get("logprobs")
    top = body.get("top_logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise ScoringError(f"logprobs must be a boolean, got {logprobs!r}", param="logprobs")
    if top is not None:
        if (
            isinstance(top, bool)
            or not isinstance(top, int)
            or not 0 <= top <= MAX_CHAT_TOP_LOGPROBS
        ):
            raise ScoringError(
                f"top_logprobs must be an integer in [0, {MAX_CHAT_TOP_LOGPROBS}], got {top!r}",
                param="top_logprobs",
            )
        if not logprobs:
            raise ScoringError("top_logprobs needs logprobs: true", param="top_logprobs")
    return Scoring(logprobs=bool(logprobs), top=top or 0)


def _number(value: float) -> float | None:
    return None if math.isnan(value) else value


def logprobs_object(
    token_texts: list[str],
    *,
    prompt_scores: list[float] | None,
    token_scores: list[float],
    echo: bool,
    top: Sequence[Top | None] | None = None,
) -> dict[str, Any]:
    """OpenAI's completions `logprobs` object. token_texts: each token's text, the prompt's
    first when echo; prompt_scores: log P(prompt[i] | prompt[:i]) for i >= 1; top: each
    position's alternatives, parallel to token_texts (None where nothing is scored), or
    None when none were asked. Alternatives whose texts coincide keep the likeliest."""
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
        "top_logprobs": None if top is None else [_top_dict(t) for t in top],
        "text_offset": offsets,
    }


def _top_dict(top: Top | None) -> dict[str, float | None] | None:
    if top is None:
        return None
    out: dict[str, float | None] = {}
    for text, score in top:
        out.setdefault(text, _number(score))
    return out


def chat_logprobs_object(
    token_texts: list[str], *, token_scores: list[float], top: Sequence[Top] | None = None
) -> dict[str, Any]:
    """OpenAI's chat `logprobs` object: each generated token, its log-probability and its
    text's UTF-8 bytes (a token that ends inside a character decodes to U+FFFD alone, so
    its bytes are those of U+FFFD), and its alternatives (`top`, parallel; none when
    None)."""
    tops: Sequence[Top] = top if top is not None else [()] * len(token_texts)
    return {
        "content": [
            {
                **_chat_entry(text, score),
                "top_logprobs": [_chat_entry(t, s) for t, s in alternatives],
            }
            for text, score, alternatives in zip(token_texts, token_scores, tops, strict=True)
        ]
    }


def _chat_entry(text: str, score: float) -> dict[str, Any]:
    return {"token": text, "logprob": _number(score), "bytes": list(text.encode("utf-8"))}
