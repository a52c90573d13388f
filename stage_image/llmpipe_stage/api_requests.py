"""Stage 0's OpenAI request parsing: body bytes in, a checked request out. Pure.

No aiohttp, no torch, no tokenizer, no I/O: the gateway calls `parse_body` and
`parse_completion` (in a worker thread, since a large body takes a while to decode), then
tokenizes, then `fit_context` checks the prompt's tokens against the context limit. Every
malformed body raises `RequestError`, which the gateway answers with HTTP 400 (or the
error's `status`) in OpenAI's error shape; nothing a client sends may end in a 500.

Strict where OpenAI is strict: booleans are JSON booleans (`"stream": "false"` is refused,
not read as true), numbers are JSON numbers, strings are valid Unicode (no unpaired
surrogates, which no tokenizer can encode), objects nest at most `MAX_DEPTH` levels.
Fields the API does not know are ignored, as OpenAI-compatible servers do; fields it knows
but cannot honour (tools, a JSON response format, penalties, logit bias, best_of, suffix)
are refused by name rather than ignored, since ignoring them returns an answer other than
the one asked for.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llmpipe_stage import scoring

MAX_DEPTH = 32
"""Nesting a request body may have; real requests need 4 (body > messages > message > part)."""
MAX_STOP = 4
MAX_STOP_CHARS = 256
"""Stop strings are matched against the text after every token (cost grows with their
length squared); real ones are a few characters."""
INT64_MAX = 2**63 - 1
DEFAULT_MAX_PROMPT_CHARS = 1_000_000
"""About 250k tokens of English text: more than any context this project serves, and a
prompt this long takes well under a second to tokenize off the event loop."""
MAX_MESSAGES = 4096
"""Messages per chat request: the template renders each one (in Python), so even empty
ones cost time; long conversations have hundreds."""
ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_CHOICES = 16
"""`n` at most: each choice is a sequence of its own in the pipeline (its prompt prefilled
again), so a large n is a large batch that one request would hold."""


class RequestError(ValueError):
    """A request the API rejects with HTTP 400 (or `status`); the text says what to change."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param


def max_body_bytes(max_prompt_chars: int) -> int:
    """Body size a request within the prompt limit can need: a character may take up to 6
    bytes as a JSON escape (surrogate pairs 12 for one character), plus 1 MiB for the rest."""
    return 8 * max_prompt_chars + (1 << 20)


@dataclass(frozen=True)
class Options:
    """The sampling and response fields of a completion request, checked."""

    max_tokens: int | None = None
    """None: the endpoint's default (16 for completions, the room left for chat)."""
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    """vLLM's extension: generate exactly max_tokens (benchmarks)."""
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False
    logprobs: bool = False
    """Completions' `logprobs: 0`: the chosen tokens' log-probabilities (llmpipe_stage.scoring)."""
    echo: bool = False
    """Completions' `echo`: the prompt in front of the text (scored too with logprobs)."""
    top_logprobs: int = 0
    """The most likely tokens to list at each scored position (completions' `logprobs: N`,
    chat's `top_logprobs`)."""
    n: int = 1
    """Choices to generate for the prompt, each its own sequence (and seed + index)."""


@dataclass(frozen=True)
class CompletionRequest:
    """A parsed /v1/completions or /v1/chat/completions body, before tokenizing."""

    chat: bool
    options: Options
    text: str | None = None
    """Completions: the prompt as text (None when it came as token ids)."""
    token_ids: tuple[int, ...] | None = None
    """Completions: the prompt as token ids."""
    messages: tuple[tuple[str, str], ...] = ()
    """Chat: (role, content) pairs, content parts already joined."""

    @property
    def prompt_param(self) -> str:
        return "messages" if self.chat else "prompt"


@dataclass(frozen=True)
class Generation:
    """A request ready to run: its prompt's token ids and how many tokens to generate."""

    prompt_ids: list[int]
    max_tokens: int
    options: Options


# -- the body ---------------------------------------------------------------------------------
def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (use a number)")


def parse_body(data: bytes) -> dict[str, Any]:
    """The body as a JSON object; RequestError for anything else."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RequestError(
            f"request body is not valid UTF-8 (byte {error.start}: {error.reason})"
        ) from None
    try:
        body = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise RequestError(f"request body nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as error:  # JSONDecodeError, NaN/Infinity, integers too long to parse
        raise RequestError(f"request body is not valid JSON: {_clip(str(error))}") from None
    if not isinstance(body, dict):
        raise RequestError(f"request body must be a JSON object, got {_kind(body)}")
    _check_depth(body)
    return body


def _check_depth(body: object) -> None:
    """Iterative (never recursive): a body nested deeply must not exhaust the stack later."""
    stack: list[tuple[object, int]] = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise RequestError(f"request body nests deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values() if isinstance(v, dict | list))
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value if isinstance(v, dict | list))


# -- field checks -----------------------------------------------------------------------------
def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _show(value: object) -> str:
    """A value for an error message: short, whatever the client sent."""
    if isinstance(value, dict | list):
        return _kind(value)
    return _clip(repr(value), 60)


def _kind(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "a number"
    return names.get(type(value), type(value).__name__)


def _flag(body: Mapping[str, Any], key: str, *, where: str = "") -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(
            f"{where}{key} must be true or false (a JSON boolean), got {_show(value)}",
            param=f"{where}{key}",
        )
    return value


def _number(body: Mapping[str, Any], key: str, *, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        raise RequestError(
            f"{key} must be a number in [{low}, {high}], got {_show(value)}", param=key
        )
    return float(value)


def _integer(body: Mapping[str, Any], key: str, *, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(
            f"{key} must be an integer in [{low}, {high}], got {_show(value)}", param=key
        )
    return value


def _text(value: str, param: str) -> str:
    """Tokenizers take valid Unicode only: JSON can carry unpaired surrogates ("\\ud800")."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(
                f"{param} contains an unpaired UTF-16 surrogate (not valid Unicode)", param=param
            ) from None
    return value


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if (
        not isinstance(stop, list)
        or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop)
        or len(stop) > MAX_STOP
    ):
        raise RequestError(
            f"stop must be a string or a list of up to {MAX_STOP} non-empty strings "
            f"of at most {MAX_STOP_CHARS} characters",
            param="stop",
        )
    return tuple(stop)


def parse_options(body: Mapping[str, Any]) -> Options:
    """The sampling and response fields, each checked for type and range."""
    n = _integer(body, "n", low=1, high=1 << 31)
    if n is not None and n > MAX_CHOICES:
        raise RequestError(
            f"n is {n}; this server generates at most {MAX_CHOICES} choices per request",
            param="n",
        )
    stream = _flag(body, "stream")
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise RequestError(
            f"stream_options must be an object, got {_show(stream_options)}",
            param="stream_options",
        )
    include_usage = _flag(stream_options or {}, "include_usage", where="stream_options.")
    completion_tokens = _integer(body, "max_completion_tokens", low=1, high=INT64_MAX)
    return Options(
        max_tokens=(
            completion_tokens
            if completion_tokens is not None
            else _integer(body, "max_tokens", low=1, high=INT64_MAX)
        ),
        temperature=_number(body, "temperature", default=1.0, low=0.0, high=2.0),
        top_p=_number(body, "top_p", default=1.0, low=0.0, high=1.0),
        seed=_integer(body, "seed", low=-INT64_MAX - 1, high=INT64_MAX),
        ignore_eos=_flag(body, "ignore_eos"),
        stop=_stop(body),
        stream=stream,
        include_usage=include_usage,
        return_token_ids=_flag(body, "return_token_ids"),
        n=n or 1,
    )


UNHONOURED = (
    ("tools", "tool calls are not supported (no tool-call parser); send the tools in the prompt"),
    ("functions", "function calls are not supported (no tool-call parser)"),
    ("logit_bias", "logit_bias is not supported"),
    ("suffix", "suffix (insertion) is not supported"),
)
"""Fields refused when set to anything but their empty value."""


def refuse_unhonoured(body: Mapping[str, Any]) -> None:
    """A 400 naming the first field set that the pipeline cannot honour."""
    no_calls = body.get("tool_choice") == "none"  # tools listed, none to be called: fine
    for key, reason in UNHONOURED:
        if no_calls and key in ("tools", "functions"):
            continue
        if body.get(key) not in (None, [], {}, ""):
            raise RequestError(reason, param=key)
    for key in ("presence_penalty", "frequency_penalty"):
        value = body.get(key)
        if value not in (None, 0, 0.0) or isinstance(value, bool):
            raise RequestError(f"{key} is not supported (only 0)", param=key)
    if body.get("best_of") not in (None, 1) or isinstance(body.get("best_of"), bool):
        raise RequestError(
            "best_of is not supported (only 1; use n for several choices)", param="best_of"
        )
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise RequestError(
            'response_format is not supported (no constrained decoding): only {"type": "text"}',
            param="response_format",
        )


def check_model(body: Mapping[str, Any], *, model_name: str) -> None:
    model = body.get("model")
    if model is None:
        return
    if not isinstance(model, str):
        raise RequestError(f"model must be a string, got {_show(model)}", param="model")
    if model != model_name:
        raise RequestError(
            f"model {_clip(model, 80)!r} does not exist; this server serves {model_name!r}",
            status=404,
            param="model",
        )


# -- prompts ----------------------------------------------------------------------------------
def _too_long(chars: int, limit: int, param: str) -> RequestError:
    return RequestError(
        f"the prompt is {chars} characters; this server takes at most {limit} "
        "(the stage's --max-prompt-chars); shorten the prompt",
        param=param,
    )


def _text_prompt(body: Mapping[str, Any], *, max_chars: int) -> tuple[str | None, tuple[int, ...]]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # one prompt in a batch of one
    if isinstance(prompt, str):
        if len(prompt) > max_chars:
            raise _too_long(len(prompt), max_chars, "prompt")
        return _text(prompt, "prompt"), ()
    if isinstance(prompt, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt
    ):
        if len(prompt) > max_chars:
            raise _too_long(len(prompt), max_chars, "prompt")
        return None, tuple(prompt)
    raise RequestError(
        "prompt must be a string or a list of token ids (one prompt per request)", param="prompt"
    )


def _content(value: object) -> str | None:
    """A message's content: a string, or a list of text parts (joined by newlines)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        for part in value
    ):
        return "\n".join(part["text"] for part in value)
    return None


def _messages(body: Mapping[str, Any], *, max_chars: int) -> tuple[tuple[str, str], ...]:
    messages = body.get("messages")
    shape = RequestError(
        "messages must be a non-empty list of {role, content} objects; content is a string "
        f"or a list of text parts; role is one of {', '.join(ROLES)}",
        param="messages",
    )
    if not isinstance(messages, list) or not messages:
        raise shape
    if len(messages) > MAX_MESSAGES:
        raise RequestError(
            f"messages holds {len(messages)} messages; at most {MAX_MESSAGES} are taken",
            param="messages",
        )
    parsed: list[tuple[str, str]] = []
    chars = 0
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise shape
        content = _content(message.get("content"))
        if content is None:
            raise shape
        chars += len(content)
        if chars > max_chars:
            raise _too_long(chars, max_chars, "messages")
        parsed.append((message["role"], _text(content, f"messages[{index}].content")))
    return tuple(parsed)


def parse_completion(
    body: Mapping[str, Any], *, chat: bool, model_name: str, max_prompt_chars: int
) -> CompletionRequest:
    """Everything that can be checked before tokenizing (cheap: no tokenizer, no model)."""
    check_model(body, model_name=model_name)
    refuse_unhonoured(body)
    options = parse_options(body)
    try:
        asked = scoring.parse_scoring(body, chat=chat, stream=options.stream)
    except scoring.ScoringError as error:
        raise RequestError(str(error), param=error.param) from None
    options = dataclasses.replace(
        options, logprobs=asked.logprobs, echo=asked.echo, top_logprobs=asked.top
    )
    if chat:
        return CompletionRequest(
            chat=True, options=options, messages=_messages(body, max_chars=max_prompt_chars)
        )
    text, ids = _text_prompt(body, max_chars=max_prompt_chars)
    return CompletionRequest(
        chat=False, options=options, text=text, token_ids=None if text is not None else ids
    )


def fit_context(
    request: CompletionRequest,
    prompt_ids: list[int],
    *,
    context_limit: int,
    vocab_size: int,
    default_max: int | None,
) -> Generation:
    """Check the tokenized prompt and max_tokens against the context limit (prompt plus
    completion) and the vocabulary; `default_max` None means all the room that is left."""
    param = request.prompt_param
    if not prompt_ids:
        raise RequestError("the prompt is empty", param=param)
    if request.token_ids is not None and not all(0 <= t < vocab_size for t in prompt_ids):
        raise RequestError(f"prompt token ids must be in [0, {vocab_size})", param="prompt")
    if len(prompt_ids) >= context_limit:
        raise RequestError(
            f"the prompt is {len(prompt_ids)} tokens but this pipeline's context limit is "
            f"{context_limit} tokens (prompt plus completion); shorten the prompt",
            param=param,
        )
    room = context_limit - len(prompt_ids)
    max_tokens = request.options.max_tokens
    if max_tokens is None:
        max_tokens = room if default_max is None else min(default_max, room)
    if max_tokens > room:
        raise RequestError(
            f"this pipeline's context limit is {context_limit} tokens; the prompt is "
            f"{len(prompt_ids)} tokens and max_tokens is {max_tokens}; lower max_tokens to "
            f"{room} or less",
            param="max_tokens",
        )
    return Generation(prompt_ids=prompt_ids, max_tokens=max_tokens, options=request.options)


# -- streaming helpers ------------------------------------------------------------------------
