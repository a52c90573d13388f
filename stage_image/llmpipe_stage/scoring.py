"""Log-probabilities: completions' `logprobs` and `echo`, chat's `logprobs` (pure).

`logprobs: 0` on `/v1/completions` (and `logprobs: true` on `/v1/chat/completions`)
returns the log-probability (under the model, before temperature and top-p) of every
generated token; with completions' `echo: true` the prompt comes back in front of the
text and its tokens are scored too (the first has no log-probability), which is how a
client measures perplexity. Alternatives (`logprobs` > 0, chat's `top_logprobs` > 0: OpenAI's
top-k lists) are not computed; asking for them is refused rather than answered with less
than was asked. Streamed, each chunk carries the scores of the tokens that came with it;
prompt scores (`echo` with `logprobs`) come only with a whole reply.
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
    """Read `logprobs` and `echo` (completions) or `logprobs` and `top_logprobs` (chat)."""
    if chat:
        return _parse_chat_scoring(body)
    logprobs = body.get("logprobs")
    echo = body.get("echo", False)
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
    if stream and echo:
        raise ScoringError(
            "logprobs with echo are not supported with stream=true (the prompt's scores come "
            "with the whole reply only)",
            param="logprobs",
        )
    return Scoring(logprobs=True, echo=echo)


def _parse_chat_scoring(body: Mapping[str, Any]) -> Scoring:
    """Chat: `logprobs` is a boolean; `top_logprobs` (0-20, only with logprobs) must be 0."""
    logprobs = body.get("logprobs")
    top = body.get("top_logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise ScoringError(f"logprobs must be a boolean, got {logprobs!r}", param="logprobs")
    if top is not None:
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20:
            raise ScoringError(
                f"top_logprobs must be an integer in [0, 20], got {top!r}", param="top_logprobs"
            )
        if not logprobs:
            raise ScoringError("top_logprobs needs logprobs: true", param="top_logprobs")
        if top > 0:
            raise ScoringError(
                "only top_logprobs=0 is supported (the chosen tokens' log-probabilities, "
                "no alternatives)",
                param="top_logprobs",
            )
    return Scoring(logprobs=bool(logprobs))


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


def chat_logprobs_object(token_texts: list[str], *, token_scores: list[float]) -> dict[str, Any]:
    """OpenAI's chat `logprobs` object: each generated token, its log-probability and its
    text's UTF-8 bytes (a token that ends inside a character decodes to U+FFFD alone, so
    its bytes are those of U+FFFD), with no alternatives."""
    return {
        "content": [
            {
                "token": text,
                "logprob": _number(score),
                "bytes": list(text.encode("utf-8")),
                "top_logprobs": [],
            }
            for text, score in zip(token_texts, token_scores, strict=True)
        ]
    }
