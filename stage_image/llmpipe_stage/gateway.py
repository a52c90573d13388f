"""HTTP side of a stage (aiohttp, on the same event loop as gRPC).

Every stage: `/healthz` (alive; JSON with loading progress), `/readyz` (weights loaded and
serving; on stage 0 also every other stage ready), `/metrics` (Prometheus).
Stage 0 also serves the OpenAI-compatible API: `/v1/models`, `/v1/completions`,
`/v1/chat/completions` with server-sent-event streaming, `max_tokens`, `temperature`,
`top_p`, `stop`, `seed`. Errors use OpenAI's shape: `{"error": {"message", "type", ...}}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from llmpipe_stage import server
from llmpipe_stage.coordinator import PipelineError, SamplingParams

log = logging.getLogger(__name__)
STAGE_KEY = web.AppKey("stage", server.Stage)


class RequestError(ValueError):
    """A request the API rejects with HTTP 400 (or `status`); the text says what to change."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param


@dataclass(frozen=True)
class Generation:
    """A parsed completion request."""

    prompt_ids: list[int]
    params: SamplingParams
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    return_token_ids: bool


def error_response(
    message: str,
    *,
    status: int,
    kind: str,
    param: str | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return web.json_response(body, status=status)


# -- request parsing (pure) -------------------------------------------------------------------
def _number(body: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise RequestError(f"{key} must be a number in [{low}, {high}], got {value!r}", param=key)
    return float(value)


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if (
        not isinstance(stop, list)
        or not all(isinstance(s, str) and s for s in stop)
        or len(stop) > 4
    ):
        raise RequestError(
            "stop must be a string or a list of up to 4 non-empty strings", param="stop"
        )
    return tuple(stop)


def parse_generation(
    body: dict[str, Any],
    prompt_ids: list[int],
    *,
    context_limit: int,
    default_max: int | None,
) -> Generation:
    """Check sampling fields and the context limit (prompt + completion)."""
    if body.get("n", 1) != 1:
        raise RequestError("only n=1 is supported", param="n")
    if len(prompt_ids) == 0:
        raise RequestError("the prompt is empty", param="prompt")
    if len(prompt_ids) >= context_limit:
        raise RequestError(
            f"the prompt is {len(prompt_ids)} tokens but this pipeline's context limit is "
            f"{context_limit} tokens (prompt plus completion); shorten the prompt",
            param="messages" if "messages" in body else "prompt",
        )
    room = context_limit - len(prompt_ids)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = room if default_max is None else min(default_max, room)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise RequestError(
            f"max_tokens must be a positive integer, got {max_tokens!r}", param="max_tokens"
        )
    if max_tokens > room:
        raise RequestError(
            f"this pipeline's context limit is {context_limit} tokens; the prompt is "
            f"{len(prompt_ids)} tokens and max_tokens is {max_tokens}; lower max_tokens to "
            f"{room} or less",
            param="max_tokens",
        )
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(f"seed must be an integer, got {seed!r}", param="seed")
    stream_options = body.get("stream_options") or {}
    params = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0) or 1.0,
        seed=seed,
        # vLLM's extension: generate exactly max_tokens (benchmarks).
        ignore_eos=bool(body.get("ignore_eos", False)),
    )
    return Generation(
        prompt_ids=prompt_ids,
        params=params,
        stop=_stop(body),
        stream=bool(body.get("stream", False)),
        include_usage=bool(stream_options.get("include_usage", False)),
        return_token_ids=bool(body.get("return_token_ids", False)),
    )


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


# -- the OpenAI API ---------------------------------------------------------------------------
class OpenAIHandlers:
    def __init__(self, stage: server.Stage, *, model_name: str) -> None:
        self.stage = stage
        self.tokenizer: Any = None  # set once the stage has loaded (attach_coordinator)
        self.model_name = model_name
        self.created = int(time.time())

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.model_name,
                        "object": "model",
                        "created": self.created,
                        "owned_by": "llmpipe",
                    }
                ],
            }
        )

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def _serve(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        if self.tokenizer is None or self.stage.coordinator is None:
            return error_response(
                f"stage 0 is {self.stage.progress.phase}; retry when /readyz says ready",
                status=503,
                kind="service_unavailable",
            )
        try:
            body = await request.json()
        except json.JSONDecodeError as error:
            return error_response(
                f"request body is not JSON: {error}", status=400, kind="invalid_request_error"
            )
        try:
            if not isinstance(body, dict):
                raise RequestError("request body must be a JSON object")
            self._check_model(body)
            prompt_ids = self._chat_prompt(body) if chat else self._text_prompt(body)
            assert self.stage.runtime is not None
            generation = parse_generation(
                body,
                prompt_ids,
                context_limit=self.stage.runtime.context_limit,
                default_max=None if chat else 16,
            )
        except RequestError as error:
            return error_response(
                str(error), status=error.status, kind="invalid_request_error", param=error.param
            )
        # A ring that just returned a token is up; otherwise ask every stage (fail fast on a
        # dead or stuck one). Skipping the check under load keeps a busy stage's slow
        # answer from turning into a false 503.
        ready, reason = True, ""
        if not self.stage.coordinator.progressing(within_s=1.0):
            ready, reason = await self.stage.pipeline_status()
        if not ready:
            return error_response(
                f"the pipeline is not available: {reason}", status=503, kind="service_unavailable"
            )
        kind = "chat.completion" if chat else "text_completion"
        reply_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if generation.stream:
            return await self._stream(request, generation, chat=chat, reply_id=reply_id)
        return await self._complete(generation, chat=chat, reply_id=reply_id, kind=kind)

    def _check_model(self, body: dict[str, Any]) -> None:
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise RequestError(
                f"model {model!r} does not exist; this server serves {self.model_name!r}",
                status=404,
                param="model",
            )

    def _text_prompt(self, body: dict[str, Any]) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt))
        vocab = len(self.tokenizer)
        if isinstance(prompt, list) and all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in prompt
        ):
            return list(prompt)
        raise RequestError(
            "prompt must be a string or a list of token ids "
            f"in [0, {vocab}) (one prompt per request)",
            param="prompt",
        )

    def _chat_prompt(self, body: dict[str, Any]) -> list[int]:
        messages = body.get("messages")
        if (
            not isinstance(messages, list)
            or not messages
            or not all(
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
                for m in messages
            )
        ):
            raise RequestError(
                "messages must be a non-empty list of {role, content} objects with string content",
                param="messages",
            )
        text = self.tokenizer.apply_chat_template(
            [{"role": m["role"], "content": m["content"]} for m in messages],
            tokenize=False,
            add_generation_prompt=True,
        )
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    async def _tokens(
        self, generation: Generation
    ) -> AsyncIterator[tuple[str, str | None, list[int]]]:
        """Yield (new text, finish reason or None, token ids so far) as tokens arrive."""
        assert self.stage.coordinator is not None
        ids: list[int] = []
        sent = 0
        finish = "length"
        eos = self.stage.coordinator.settings.eos_token_ids
        async with contextlib.aclosing(
            self.stage.coordinator.generate(generation.prompt_ids, generation.params)
        ) as tokens:
            # Without streaming or stop strings the text is only needed once, at the end.
            incremental = generation.stream or bool(generation.stop)
            async for token in tokens:
                ids.append(token)
                if token in eos and not generation.params.ignore_eos:
                    finish = "stop"
                if not incremental:
                    continue
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                cut = find_stop(text, generation.stop, start=sent)
                if cut >= 0:
                    yield text[sent:cut], "stop", ids
                    return
                # Hold back an incomplete character and a possible start of a stop string.
                safe = len(text) - held_back(text, generation.stop)
                if text.endswith("\ufffd"):
                    safe = min(safe, len(text) - 1)
                if safe > sent:
                    yield text[sent:safe], None, ids
                    sent = safe
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            yield text[sent:], finish, ids

    async def _complete(
        self, generation: Generation, *, chat: bool, reply_id: str, kind: str
    ) -> web.Response:
        parts: list[str] = []
        finish: str | None = None
        ids: list[int] = []
        try:
            async for text, reason, so_far in self._tokens(generation):
                parts.append(text)
                finish, ids = reason, so_far
        except PipelineError as error:
            return error_response(
                f"the pipeline failed: {error}", status=503, kind="service_unavailable"
            )
        content = "".join(parts)
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": content}
        else:
            choice["text"] = content
        if generation.return_token_ids:
            choice["token_ids"] = ids
        return web.json_response(
            {
                "id": reply_id,
                "object": kind,
                "created": int(time.time()),
                "model": self.model_name,
                "choices": [choice],
                "usage": self._usage(generation, ids),
            }
        )

    def _usage(self, generation: Generation, ids: list[int]) -> dict[str, int]:
        prompt = len(generation.prompt_ids)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": len(ids),
            "total_tokens": prompt + len(ids),
        }

    async def _stream(
        self, request: web.Request, generation: Generation, *, chat: bool, reply_id: str
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, *, role: bool = False) -> bytes:
            if chat:
                delta: dict[str, Any] = (
                    {"role": "assistant", "content": ""}
                    if role
                    else ({"content": text} if text else {})
                )
                choice: dict[str, Any] = {
                    "index": 0,
                    "delta": delta,
                    "finish_reason": finish,
                    "logprobs": None,
                }
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            payload = {
                "id": reply_id,
                "object": kind,
                "created": created,
                "model": self.model_name,
                "choices": [choice],
            }
            return f"data: {json.dumps(payload)}\n\n".encode()

        ids: list[int] = []
        try:
            if chat:
                await response.write(chunk(None, None, role=True))
            async for text, finish, so_far in self._tokens(generation):
                ids = so_far
                if text or finish:
                    await response.write(chunk(text, finish))
            if generation.include_usage:
                usage = {
                    "id": reply_id,
                    "object": kind,
                    "created": created,
                    "model": self.model_name,
                    "choices": [],
                    "usage": self._usage(generation, ids),
                }
                await response.write(f"data: {json.dumps(usage)}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
        except PipelineError as error:
            body = {
                "error": {
                    "message": f"the pipeline failed: {error}",
                    "type": "service_unavailable",
                    "code": 503,
                }
            }
            await response.write(f"data: {json.dumps(body)}\n\n".encode())
        except (ConnectionResetError, asyncio.CancelledError):
            log.info("client went away; its sequence was freed")
            raise
        return response


HANDLERS_KEY = web.AppKey("openai", OpenAIHandlers)


# -- health and metrics (every stage) ---------------------------------------------------------
async def healthz(request: web.Request) -> web.Response:
    stage = request.app[STAGE_KEY]
    progress = stage.progress
    body = {
        "status": "failed" if progress.phase == "failed" else "alive",
        "stage": stage.index,
        "phase": progress.phase,
        "loadedTensors": progress.loaded,
        "totalTensors": progress.total,
        "layers": [stage.plan.layer_start, stage.plan.layer_end],
        "error": progress.error,
    }
    return web.json_response(body, status=500 if progress.phase == "failed" else 200)


async def readyz(request: web.Request) -> web.Response:
    stage = request.app[STAGE_KEY]
    if stage.index == 0:
        ready, reason = await stage.pipeline_status()
    else:
        ready, reason = stage.ready, f"stage {stage.index} is {stage.progress.phase}"
    return web.json_response({"ready": ready, "reason": reason}, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    stage = request.app[STAGE_KEY]
    return web.Response(
        body=stage.metrics.render(),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )


async def start_http(stage: server.Stage, *, host: str, port: int) -> web.AppRunner:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STAGE_KEY] = stage
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    if stage.index == 0:
        handlers = OpenAIHandlers(stage, model_name=stage.settings.pipeline.model_name)
        app[HANDLERS_KEY] = handlers
        app.router.add_get("/v1/models", handlers.models)
        app.router.add_post("/v1/completions", handlers.completions)
        app.router.add_post("/v1/chat/completions", handlers.chat_completions)
    # A client that disconnects cancels its handler, which frees the sequence everywhere.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


async def attach_coordinator(stage: server.Stage, runner: web.AppRunner) -> None:
    """Stage 0, once loaded: tokenizer and coordinator behind the OpenAI routes."""
    from transformers import AutoTokenizer

    loop = asyncio.get_running_loop()
    tokenizer = await loop.run_in_executor(
        stage.executor, AutoTokenizer.from_pretrained, str(stage.settings.model_dir)
    )
    assert stage.runtime is not None
    config = stage.runtime.stage.config
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
    stage.coordinator = server.make_coordinator(stage, eos_token_ids=eos_ids)
    stage.tokenizer = tokenizer
    runner.app[HANDLERS_KEY].tokenizer = tokenizer
