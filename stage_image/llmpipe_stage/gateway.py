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
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from llmpipe_stage import api_keys, api_requests, scoring, server
from llmpipe_stage.coordinator import PipelineError, SamplingParams, Scores

log = logging.getLogger(__name__)
STAGE_KEY = web.AppKey("stage", server.Stage)


def error_response(
    message: str,
    *,
    status: int,
    kind: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def request_error(error: api_requests.RequestError) -> web.Response:
    return error_response(
        str(error), status=error.status, kind="invalid_request_error", param=error.param
    )


def sampling_params(generation: api_requests.Generation) -> SamplingParams:
    options = generation.options
    return SamplingParams(
        max_new_tokens=generation.max_tokens,
        temperature=options.temperature,
        top_p=options.top_p,
        seed=options.seed,
        ignore_eos=options.ignore_eos,
        logprobs=options.logprobs,
        # echo with logprobs: the last stage scores the prompt too
        prompt_logprobs=options.logprobs and options.echo,
    )


# -- the OpenAI API ---------------------------------------------------------------------------
class OpenAIHandlers:
    def __init__(
        self,
        stage: server.Stage,
        *,
        model_name: str,
        max_prompt_chars: int,
        executor: ThreadPoolExecutor,
    ) -> None:
        self.stage = stage
        self.tokenizer: Any = None  # set once the stage has loaded (attach_coordinator)
        self.model_name = model_name
        self.max_prompt_chars = max_prompt_chars
        # Parsing and tokenizing run here, never on the event loop, and not in the compute
        # thread either: a long prompt must not hold up the ring's micro-batches.
        self.executor = executor
        # One prompt at a time through the tokenizer: a fast tokenizer is not safe to call
        # from two threads at once ("Already borrowed"); bodies still parse side by side.
        self.tokenizing = threading.Lock()
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
            data = await request.read()
        except web.HTTPRequestEntityTooLarge:
            limit = api_requests.max_body_bytes(self.max_prompt_chars)
            return error_response(
                f"request body is larger than {limit} bytes (the stage takes prompts "
                f"of up to {self.max_prompt_chars} characters)",
                status=413,
                kind="invalid_request_error",
            )
        loop = asyncio.get_running_loop()
        try:
            generation = await loop.run_in_executor(self.executor, self._prepare, data, chat)
        except api_requests.RequestError as error:
            return request_error(error)
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
        if generation.options.stream:
            return await self._stream(request, generation, chat=chat, reply_id=reply_id)
        return await self._complete(generation, chat=chat, reply_id=reply_id, kind=kind)

    def _prepare(self, data: bytes, chat: bool) -> api_requests.Generation:
        """In the tokenizer thread: body bytes -> checked request -> token ids -> limits."""
        body = api_requests.parse_body(data)
        parsed = api_requests.parse_completion(
            body, chat=chat, model_name=self.model_name, max_prompt_chars=self.max_prompt_chars
        )
        assert self.stage.runtime is not None
        with self.tokenizing:
            prompt_ids = self._prompt_ids(parsed)
        return api_requests.fit_context(
            parsed,
            prompt_ids,
            context_limit=self.stage.runtime.context_limit,
            vocab_size=len(self.tokenizer),
            default_max=None if chat else 16,
        )

    def _prompt_ids(self, parsed: api_requests.CompletionRequest) -> list[int]:
        if parsed.token_ids is not None:
            return list(parsed.token_ids)
        if not parsed.chat:
            return list(self.tokenizer.encode(parsed.text))
        try:
            text = self.tokenizer.apply_chat_template(
                [{"role": role, "content": content} for role, content in parsed.messages],
                tokenize=False,
                add_generation_prompt=True,
            )
        except Exception as error:  # noqa: BLE001 (classified: a client error, below)
            # The template is the model's own code over checked strings: what it raises is
            # its refusal of this conversation (e.g. "roles must alternate"), a client error.
            raise api_requests.RequestError(
                f"the model's chat template refused these messages: {error}", param="messages"
            ) from None
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    async def _tokens(
        self, generation: api_requests.Generation, *, scores: Scores | None = None
    ) -> AsyncIterator[tuple[str, str | None, list[int]]]:
        """Yield (new text, finish reason or None, token ids so far) as tokens arrive."""
        assert self.stage.coordinator is not None
        ids: list[int] = []
        sent = 0
        finish = "length"
        eos = self.stage.coordinator.settings.eos_token_ids
        async with contextlib.aclosing(
            self.stage.coordinator.generate(
                generation.prompt_ids, sampling_params(generation), scores=scores
            )
        ) as tokens:
            # Without streaming or stop strings the text is only needed once, at the end.
            stops = generation.options.stop
            incremental = generation.options.stream or bool(stops)
            async for token in tokens:
                ids.append(token)
                if token in eos and not generation.options.ignore_eos:
                    finish = "stop"
                if not incremental:
                    continue
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                cut = api_requests.find_stop(text, stops, start=sent)
                if cut >= 0:
                    yield text[sent:cut], "stop", ids
                    return
                # Hold back an incomplete character and a possible start of a stop string.
                safe = len(text) - api_requests.held_back(text, stops)
                if text.endswith("\ufffd"):
                    safe = min(safe, len(text) - 1)
                if safe > sent:
                    yield text[sent:safe], None, ids
                    sent = safe
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            yield text[sent:], finish, ids

    async def _complete(
        self, generation: api_requests.Generation, *, chat: bool, reply_id: str, kind: str
    ) -> web.Response:
        parts: list[str] = []
        finish: str | None = None
        ids: list[int] = []
        scores = Scores() if generation.options.logprobs else None
        try:
            async for text, reason, so_far in self._tokens(generation, scores=scores):
                parts.append(text)
                finish, ids = reason, so_far
        except PipelineError as error:
            return error_response(
                f"the pipeline failed: {error}", status=503, kind="service_unavailable"
            )
        content = "".join(parts)
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        echo = generation.options.echo
        if echo:
            content = self.tokenizer.decode(generation.prompt_ids) + content
        if scores is not None:
            shown = [*generation.prompt_ids, *ids] if echo else ids
            choice["logprobs"] = scoring.logprobs_object(
                [self.tokenizer.decode([t]) for t in shown],
                prompt_scores=scores.prompt,
                token_scores=scores.tokens,
                echo=echo,
            )
        if chat:
            choice["message"] = {"role": "assistant", "content": content}
        else:
            choice["text"] = content
        if generation.options.return_token_ids:
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

    def _usage(self, generation: api_requests.Generation, ids: list[int]) -> dict[str, int]:
        prompt = len(generation.prompt_ids)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": len(ids),
            "total_tokens": prompt + len(ids),
        }

    async def _stream(
        self,
        request: web.Request,
        generation: api_requests.Generation,
        *,
        chat: bool,
        reply_id: str,
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
            if generation.options.include_usage:
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
    if stage.index != 0:
        ready, reason = stage.ready, f"stage {stage.index} is {stage.progress.phase}"
    else:
        # Asked every time (all stages at once, within the probe's budget): a token that
        # came back a moment ago says nothing about a stage that died since.
        ready, reason = await stage.pipeline_status()
    return web.json_response({"ready": ready, "reason": reason}, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    stage = request.app[STAGE_KEY]
    return web.Response(
        body=stage.metrics.render(),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )


# -- API keys (stage 0) -----------------------------------------------------------------------
def require_keys(ring: api_keys.KeyRing, *, protect_metrics: bool) -> Any:
    """Middleware: every path needs one of the ring's keys (fail closed: an unknown path is
    a 401 too) except /healthz and /readyz, open for the kubelet's probes, and /metrics
    unless protect_metrics."""
    open_paths = {"/healthz", "/readyz"} | (set() if protect_metrics else {"/metrics"})

    @web.middleware
    async def check(request: web.Request, handler: Any) -> web.StreamResponse:
        guarded = request.path not in open_paths
        if guarded and not ring.allows(request.headers.get("Authorization")):
            missing = api_keys.bearer_token(request.headers.get("Authorization")) is None
            return error_response(
                "missing API key: send it as 'Authorization: Bearer <key>'"
                if missing
                else "invalid API key",
                status=401,
                kind="invalid_request_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": 'Bearer realm="llmpipe"'},
            )
        response: web.StreamResponse = await handler(request)
        return response

    return check


def yield_the_cpu() -> None:
    """Runs in each tokenizer thread: a lower scheduling priority (Linux: per thread), so
    tokenizing a huge prompt takes the CPU the ring's compute and the event loop leave,
    instead of slowing the streams already running."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), TOKENIZER_NICE)


TOKENIZER_NICE = 10


# -- the listener -----------------------------------------------------------------------------
WILDCARDS = ("", "0.0.0.0", "::", "[::]")


def dual_stack_socket(port: int) -> socket.socket:
    """One socket on every IPv6 and IPv4 address (IPv4 as mapped addresses), as gRPC does
    for a wildcard; an IPv4 socket where the machine has no IPv6."""
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:
        sock = None
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("::", port))
            return sock
        except OSError as error:
            sock.close()
            if error.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT):
                raise
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", port))
    return sock


async def start_http(stage: server.Stage, *, host: str, port: int) -> web.AppRunner:
    settings = stage.settings
    middlewares = []
    if stage.index == 0 and settings.api_keys is not None:
        ring = api_keys.KeyRing(settings.api_keys)
        ring.keys()  # logs at start when the keys cannot be read
        middlewares.append(require_keys(ring, protect_metrics=settings.protect_metrics))
    app = web.Application(
        client_max_size=api_requests.max_body_bytes(settings.max_prompt_chars),
        middlewares=middlewares,
    )
    app[STAGE_KEY] = stage
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    if stage.index == 0:
        executor = ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="tokenize", initializer=yield_the_cpu
        )
        handlers = OpenAIHandlers(
            stage,
            model_name=settings.pipeline.model_name,
            max_prompt_chars=settings.max_prompt_chars,
            executor=executor,
        )
        app[HANDLERS_KEY] = handlers

        async def stop_executor(app: web.Application) -> None:
            executor.shutdown(wait=False, cancel_futures=True)

        app.on_cleanup.append(stop_executor)
        app.router.add_get("/v1/models", handlers.models)
        app.router.add_post("/v1/completions", handlers.completions)
        app.router.add_post("/v1/chat/completions", handlers.chat_completions)
    # A client that disconnects cancels its handler, which frees the sequence everywhere.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site: web.BaseSite
    if host in WILDCARDS:
        site = web.SockSite(runner, dual_stack_socket(port))
    else:
        site = web.TCPSite(runner, host, port)
    await site.start()
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
