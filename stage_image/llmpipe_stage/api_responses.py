"""Stage 0's OpenAI response bodies and the text a stream sends, token by token. Pure.

No aiohttp, no torch, no tokenizer object: the gateway passes a `decode` function (token
ids -> text) and writes what these functions return. `TextStream` turns generated token
ids into the text pieces a response carries: it finds stop strings, holds back what might
be the start of one and an incomplete character, and knows the finish reason
(`"stop"` or `"length"`). The body builders give OpenAI's shapes for a whole completion,
a streamed chunk, the usage block and an error inside a stream.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Decode = Callable[[list[int]], str]
"""Token ids -> text (the tokenizer's decode without special tokens)."""


def find_stop(text: str, stops: tuple[str, ...], *, start: int) -> int:
    """Where the earliest stop string begins in text not yet sent (from `start`), or -1.
    A stop string may straddle what was held back, so the search starts a bit earlier."""
    hits = [i for s in stops if (i := text.find(s, max(0, start - len(s) + 1))) >= 0]
    return min(hits, default=-1)


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters might start a stop string (so are not streamed yet)."""
    keep = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                keep = max(keep, n)
                break
    return keep


@dataclass
class TextStream:
    """The text of one generation as its tokens arrive."""

    decode: Decode
    stops: tuple[str, ...] = ()
    eos_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    incremental: bool = True
    """False: the text is only needed once, at the end (no streaming, no stop strings)."""
    ids: list[int] = field(default_factory=list)
    """Token ids so far."""
    finish: str = "length"
    sent: int = 0
    """Characters of the text already handed out."""
    stopped: bool = False
    """A stop string was found: the generation is over."""

    def push(self, token: int) -> str | None:
        """Take one token; the text now safe to send (None: nothing new yet)."""
        self.ids.append(token)
        if token in self.eos_token_ids and not self.ignore_eos:
            self.finish = "stop"
        if not self.incremental:
            return None
        text = self.decode(self.ids)
        cut = find_stop(text, self.stops, start=self.sent)
        if cut >= 0:
            piece, self.sent, self.stopped, self.finish = text[self.sent : cut], cut, True, "stop"
            return piece
        # Hold back an incomplete character and a possible start of a stop string.
        safe = len(text) - held_back(text, self.stops)
        if text.endswith("\ufffd"):
            safe = min(safe, len(text) - 1)
        if safe <= self.sent:
            return None
        piece, self.sent = text[self.sent : safe], safe
        return piece

    def rest(self) -> str:
        """The text not sent yet, once the tokens have ended without a stop string."""
        return self.decode(self.ids)[self.sent :]


def token_texts(decode: Decode, ids: list[int], *, window: int = 4) -> list[str]:
    """Each token's share of `decode(ids)`, for logprobs: the text a token adds after the
    `window` tokens before it. Decoding a token alone loses what depends on its neighbours
    (a SentencePiece token's leading space, a character split over byte tokens); joined,
    the shares give the decoded text. A token that ends inside a character shows nothing
    of it: the token that completes the character carries it."""
    texts = []
    for i in range(len(ids)):
        start = max(0, i - window)
        before = decode(ids[start:i]) if i > start else ""
        after = decode(ids[start : i + 1])
        settled = before.removesuffix("\ufffd")  # a character the window left incomplete
        if not after.startswith(settled):
            settled = before
        texts.append(after[len(settled) :].removesuffix("\ufffd"))
    return texts


def alternative_texts(
    decode: Decode, ids: list[int], index: int, alternatives: list[int], *, window: int = 4
) -> list[str]:
    """The share of each alternative token at position `index` of `ids`, as `token_texts`
    finds the chosen token's: what it would add after the `window` tokens before it."""
    start = max(0, index - window)
    context = ids[start:index]
    before = decode(context) if context else ""
    out = []
    for token in alternatives:
        after = decode([*context, token])
        settled = before.removesuffix("\ufffd")
        if not after.startswith(settled):
            settled = before
        out.append(after[len(settled) :].removesuffix("\ufffd"))
    return out


def model_list(model_name: str, created: int) -> dict[str, Any]:
    """`/v1/models`: the one model this pipeline serves."""
    model = {"id": model_name, "object": "model", "created": created, "owned_by": "llmpipe"}
    return {"object": "list", "data": [model]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass(frozen=True)
class Reply:
    """What every body of one response repeats."""

    id: str
    object: str
    created: int
    model: str

    def body(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }


def event(payload: dict[str, Any]) -> bytes:
    """One server-sent event."""
    return f"data: {json.dumps(payload)}\n\n".encode()


DONE = b"data: [DONE]\n\n"
KEEP_ALIVE = b": keep-alive\n\n"
"""An SSE comment: clients skip it; it keeps a paused stream's connection open."""


def stream_choice(
    text: str | None,
    finish: str | None,
    *,
    chat: bool,
    role: bool = False,
    index: int = 0,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Choice `index` of a streamed chunk; `role` is a chat stream's opening delta;
    `logprobs` those of the tokens that arrived with this chunk."""
    if not chat:
        return {"index": index, "text": text or "", "finish_reason": finish, "logprobs": logprobs}
    delta: dict[str, Any] = (
        {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
    )
    return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}


def stream_error(reason: str) -> bytes:
    """A pipeline failure after the stream began (the status line is sent already)."""
    message = f"the pipeline failed: {reason}"
    return event({"error": {"message": message, "type": "service_unavailable", "code": 503}})


def completion_choice(
    content: str,
    finish: str | None,
    *,
    chat: bool,
    logprobs: dict[str, Any] | None,
    token_ids: list[int] | None,
    index: int = 0,
) -> dict[str, Any]:
    """Choice `index` of a whole (not streamed) completion; token_ids when asked for."""
    choice: dict[str, Any] = {"index": index, "finish_reason": finish, "logprobs": logprobs}
    if chat:
        choice["message"] = {"role": "assistant", "content": content}
    else:
        choice["text"] = content
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return choice
