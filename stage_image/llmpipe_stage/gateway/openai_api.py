"""Stage 0's OpenAI-compatible routes: `/v1/models`, `/v1/completions`,
`/v1/chat/completions`, whole or streamed as server-sent events.

A request's body is parsed and tokenized off the event loop (`api_requests`, in the
tokenizer threads), submitted to the pipeline's `Generations`, and its tokens turned into
text (`api_responses.TextStream`) and OpenAI's bodies (`api_responses`). Until stage 0
has loaded (`attach`) the completion routes answer 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web
from prometheus_client import Gauge

from llmpipe_stage import api_requests, api_responses, scoring
from llmpipe_stage.gateway.protocol import Serving, Status
from llmpipe_stage.gateway.replies import error_response, request_error, unavailable
from llmpipe_stage.generation import PipelineError, SamplingParams, Scores

log = logging.getLogger(__name__)

Piece = tuple[str, str | None, list[int]]
Pieces = AsyncIterator[Piece]
"""(new text, finish reason or None, token ids so far) as tokens arrive."""

KEEP_ALIVE_S = 2.0
"""A stream silent this long (paused while a stage recovers) gets an SSE comment, so the
client, and any proxy between, keeps the connection open through the pause."""


async def with_keep_alives(pieces: Pieces, *, every_s: float) -> AsyncIterator[Piece | None]:
    """`pieces`, with None whenever `every_s` passed without one. Closing this closes
    `pieces` (which cancels the generation)."""
    pending: asyncio.Future[Piece] = asyncio.ensure_future(anext(pieces))
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=every_s)
            if not done:
                yield None
                continue
            try:
                piece = pending.result()
            except StopAsyncIteration:
                return
            yield piece
            pending = asyncio.ensure_future(anext(pieces))
    finally:
        if not pending.done():
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await pending
        aclose = getattr(pieces, "aclose", None)
        if aclose is not None:
            await aclose()


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


class OpenAIRoutes:
    def __init__(
        self,
        status: Status,
        *,
        model_name: str,
        max_prompt_chars: int,
        executor: ThreadPoolExecutor,
    ) -> None:
        self.status = status
        self.model_name = model_name
        self.max_prompt_chars = max_prompt_chars
        # Parsing and tokenizing run here, never on the event loop, and not in the compute
        # thread either: a long prompt must not hold up the ring's micro-batches.
        self.executor = executor
        # One prompt at a time through the tokenizer: a fast tokenizer is not safe to call
        # from two threads at once ("Already borrowed"); bodies still parse side by side.
        self.tokenizing = threading.Lock()
        self.created = int(time.time())
        self._serving: Serving | None = None  # set once, by attach, after loading
        # What a draining plan still holds, from the first byte read (a request being
        # tokenized is not a sequence yet) to the last written; the operator removes a
        # drained plan once this, the sequences in flight and the queue read 0.
        self.in_progress = Gauge(
            "llmpipe_requests_in_progress",
            "Completion requests being answered, body read to last byte (stage 0)",
            registry=status.registry,
        )

    def attach(self, serving: Serving) -> None:
        """Stage 0 has loaded: serve completions from now on."""
        self._serving = serving

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(api_responses.model_list(self.model_name, self.created))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def _serve(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        with self.in_progress.track_inprogress():
            return await self._answer(request, chat=chat)

    async def _answer(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        serving = self._serving
        if serving is None:
            phase = self.status.progress.phase
            return unavailable(f"stage 0 is {phase}; retry when /readyz says ready")
        try:
            data = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return too_large(self.max_prompt_chars)
        loop = asyncio.get_running_loop()
        try:
            generation = await loop.run_in_executor(
                self.executor, self._prepare, serving, data, chat
            )
        except api_requests.RequestError as error:
            return request_error(error)
        # A ring that just returned a token is up; otherwise ask every stage (fail fast on a
        # dead or stuck one). Skipping the check under load keeps a busy stage's slow
        # answer from turning into a false 503.
        # While paused sequences wait for a stage to come back, a new one waits with them.
        ready, reason = True, ""
        generations = serving.generations
        if not generations.recovering and not generations.progressing(within_s=1.0):
            ready, reason = await self.status.readiness()
        if not ready:
            return unavailable(f"the pipeline is not available: {reason}")
        reply = api_responses.Reply(
            id=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
            object=("chat.completion" if chat else "text_completion"),
            created=int(time.time()),
            model=self.model_name,
        )
        if generation.options.stream:
            return await self._stream(request, serving, generation, chat=chat, reply=reply)
        return await self._complete(serving, generation, chat=chat, reply=reply)

    def _prepare(self, serving: Serving, data: bytes, chat: bool) -> api_requests.Generation:
        """In the tokenizer thread: body bytes -> checked request -> token ids -> limits."""
        body = api_requests.parse_body(data)
        parsed = api_requests.parse_completion(
            body, chat=chat, model_name=self.model_name, max_prompt_chars=self.max_prompt_chars
        )
        with self.tokenizing:
            prompt_ids = prompt_token_ids(serving.tokenizer, parsed)
        return api_requests.fit_context(
            parsed,
            prompt_ids,
            context_limit=serving.context_limit,
            vocab_size=len(serving.tokenizer),
            default_max=None if chat else 16,
        )

    async def _pieces(
        self, serving: Serving, generation: api_requests.Generation, *, scores: Scores | None
    ) -> Pieces:
        """Submit the generation; yield its text as tokens arrive (leaving early cancels)."""
        tokenizer = serving.tokenizer
        options = generation.options
        text = api_responses.TextStream(
            decode=lambda ids: str(tokenizer.decode(ids, skip_special_tokens=True)),
            stops=options.stop,
            eos_token_ids=serving.eos_token_ids,
            ignore_eos=options.ignore_eos,
            # Without streaming or stop strings the text is only needed once, at the end.
            incremental=options.stream or bool(options.stop),
        )
        tokens = serving.generations.generate(
            generation.prompt_ids, sampling_params(generation), scores=scores
        )
        async with contextlib.aclosing(tokens):
            async for token in tokens:
                piece = text.push(token)
                if text.stopped:
                    yield piece or "", "stop", text.ids
                    return
                if piece:
                    yield piece, None, text.ids
            yield text.rest(), text.finish, text.ids

    async def _complete(
        self,
        serving: Serving,
        generation: api_requests.Generation,
        *,
        chat: bool,
        reply: api_responses.Reply,
    ) -> web.Response:
        parts: list[str] = []
        finish: str | None = None
        ids: list[int] = []
        scores = Scores() if generation.options.logprobs else None
        try:
            async for text, reason, so_far in self._pieces(serving, generation, scores=scores):
                parts.append(text)
                finish, ids = reason, so_far
        except PipelineError as error:
            return unavailable(f"the pipeline failed: {error}")
        content = "".join(parts)
        tokenizer = serving.tokenizer
        echo = generation.options.echo
        if echo:
            content = tokenizer.decode(generation.prompt_ids) + content
        logprobs = None
        if scores is not None:
            shown = [*generation.prompt_ids, *ids] if echo else ids
            logprobs = scoring.logprobs_object(
                [tokenizer.decode([t]) for t in shown],
                prompt_scores=scores.prompt,
                token_scores=scores.tokens,
                echo=echo,
            )
        choice = api_responses.completion_choice(
            content,
            finish,
            chat=chat,
            logprobs=logprobs,
            token_ids=ids if generation.options.return_token_ids else None,
        )
        usage = api_responses.usage(len(generation.prompt_ids), len(ids))
        return web.json_response(reply.body([choice], usage=usage))

    async def _stream(
        self,
        request: web.Request,
        serving: Serving,
        generation: api_requests.Generation,
        *,
        chat: bool,
        reply: api_responses.Reply,
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        chunks = api_responses.Reply(
            id=reply.id,
            object="chat.completion.chunk" if chat else "text_completion",
            created=reply.created,
            model=reply.model,
        )

        def chunk(text: str | None, finish: str | None, *, role: bool = False) -> bytes:
            choice = api_responses.stream_choice(text, finish, chat=chat, role=role)
            return api_responses.event(chunks.body([choice]))

        ids: list[int] = []
        try:
            if chat:
                await response.write(chunk(None, None, role=True))
            pieces = self._pieces(serving, generation, scores=None)
            async for piece in with_keep_alives(pieces, every_s=KEEP_ALIVE_S):
                if piece is None:
                    await response.write(api_responses.KEEP_ALIVE)
                    continue
                text, finish, so_far = piece
                ids = so_far
                if text or finish:
                    await response.write(chunk(text, finish))
            if generation.options.include_usage:
                usage = api_responses.usage(len(generation.prompt_ids), len(ids))
                await response.write(api_responses.event(chunks.body([], usage=usage)))
            await response.write(api_responses.DONE)
        except PipelineError as error:
            await response.write(api_responses.stream_error(str(error)))
        except (ConnectionResetError, asyncio.CancelledError):
            log.info("client went away; its sequence was freed")
            raise
        return response


def too_large(max_prompt_chars: int) -> web.Response:
    limit = api_requests.max_body_bytes(max_prompt_chars)
    return error_response(
        f"request body is larger than {limit} bytes (the stage takes prompts "
        f"of up to {max_prompt_chars} characters)",
        status=413,
        kind="invalid_request_error",
    )


def prompt_token_ids(tokenizer: Any, parsed: api_requests.CompletionRequest) -> list[int]:
    """The prompt's token ids: given, encoded, or the chat template's rendering encoded."""
    if parsed.token_ids is not None:
        return list(parsed.token_ids)
    if not parsed.chat:
        return list(tokenizer.encode(parsed.text))
    try:
        text = tokenizer.apply_chat_template(
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
    return list(tokenizer.encode(text, add_special_tokens=False))
