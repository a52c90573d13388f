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
from typing import Any, TypeVar

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
T = TypeVar("T")

KEEP_ALIVE_S = 2.0
"""A stream silent this long (paused while a stage recovers) gets an SSE comment, so the
client, and any proxy between, keeps the connection open through the pause."""


async def with_keep_alives(pieces: AsyncIterator[T], *, every_s: float) -> AsyncIterator[T | None]:
    """`pieces`, with None whenever `every_s` passed without one. Closing this closes
    `pieces` (which cancels the generation)."""
    pending: asyncio.Future[T] = asyncio.ensure_future(anext(pieces))
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


async def merged(streams: list[Pieces]) -> AsyncIterator[tuple[int, Piece]]:
    """The pieces of several generations (a request's `n` choices) as each arrives, tagged
    with its stream's index; each stream's own order is kept (one read of it at a time).
    Closing this closes every stream, which cancels their generations."""
    pending = {asyncio.ensure_future(anext(stream)): i for i, stream in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                index = pending.pop(future)
                try:
                    piece = future.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(streams[index]))] = index
                yield index, piece
    finally:
        for future in pending:
            future.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await future
        for stream in streams:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice `index`'s seed: the request's plus the index (wrapped into int64), so a seeded
    request with n > 1 is reproducible and its choices still differ from one another."""
    if seed is None:
        return None
    return (seed + index + 2**63) % 2**64 - 2**63


def sampling_params(generation: api_requests.Generation, *, index: int = 0) -> SamplingParams:
    options = generation.options
    return SamplingParams(
        max_new_tokens=generation.max_tokens,
        temperature=options.temperature,
        top_p=options.top_p,
        seed=choice_seed(options.seed, index),
        ignore_eos=options.ignore_eos,
        logprobs=options.logprobs,
        # echo with logprobs: the last stage scores the prompt too
        prompt_logprobs=options.logprobs and options.echo,
        top_logprobs=options.top_logprobs,
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
        self,
        serving: Serving,
        generation: api_requests.Generation,
        *,
        scores: Scores | None,
        index: int = 0,
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
            generation.prompt_ids, sampling_params(generation, index=index), scores=scores
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
        failure: BaseException | None = None
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self._choice(serving, generation, chat=chat, index=i))
                    for i in range(generation.options.n)
                ]
        except* PipelineError as failed:  # the other choices were cancelled with it
            failure = failed.exceptions[0]
        if failure is not None:
            return unavailable(f"the pipeline failed: {failure}")
        choices = [task.result() for task in tasks]
        usage = api_responses.usage(
            len(generation.prompt_ids), sum(generated for _, generated in choices)
        )
        return web.json_response(reply.body([choice for choice, _ in choices], usage=usage))

    async def _choice(
        self, serving: Serving, generation: api_requests.Generation, *, chat: bool, index: int
    ) -> tuple[dict[str, Any], int]:
        """One whole choice, and how many tokens it generated."""
        parts: list[str] = []
        finish: str | None = None
        ids: list[int] = []
        options = generation.options
        scores = Scores() if options.logprobs else None
        pieces = self._pieces(serving, generation, scores=scores, index=index)
        async for text, reason, so_far in pieces:
            parts.append(text)
            finish, ids = reason, so_far
        content = "".join(parts)
        tokenizer = serving.tokenizer
        if options.echo:
            content = tokenizer.decode(generation.prompt_ids) + content
        logprobs = None
        if scores is not None:
            logprobs = choice_logprobs(
                tokenizer, generation, ids, scores, chat=chat, echo=options.echo
            )
        choice = api_responses.completion_choice(
            content,
            finish,
            chat=chat,
            logprobs=logprobs,
            token_ids=ids if options.return_token_ids else None,
            index=index,
        )
        return choice, len(ids)

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

        def chunk(
            text: str | None,
            finish: str | None,
            *,
            index: int,
            role: bool = False,
            logprobs: dict[str, Any] | None = None,
        ) -> bytes:
            choice = api_responses.stream_choice(
                text, finish, chat=chat, role=role, index=index, logprobs=logprobs
            )
            return api_responses.event(chunks.body([choice]))

        options = generation.options
        n = options.n
        scored = [
            StreamScores(serving.tokenizer, chat=chat, top=options.top_logprobs)
            if options.logprobs
            else None
            for _ in range(n)
        ]
        generated = [0] * n
        try:
            if chat:
                for index in range(n):
                    await response.write(chunk(None, None, index=index, role=True))
            elif options.echo:  # the prompt in front of each choice's text, as when whole
                prompt = serving.tokenizer.decode(generation.prompt_ids)
                for index in range(n):
                    await response.write(chunk(prompt, None, index=index))
            streams = [
                self._pieces(serving, generation, scores=s.scores if s else None, index=i)
                for i, s in enumerate(scored)
            ]
            async for item in with_keep_alives(merged(streams), every_s=KEEP_ALIVE_S):
                if item is None:
                    await response.write(api_responses.KEEP_ALIVE)
                    continue
                index, (text, finish, so_far) = item
                generated[index] = len(so_far)
                scores = scored[index]
                logprobs = scores.new(so_far) if scores is not None else None
                if text or finish or logprobs:
                    await response.write(chunk(text, finish, index=index, logprobs=logprobs))
            if generation.options.include_usage:
                usage = api_responses.usage(len(generation.prompt_ids), sum(generated))
                await response.write(api_responses.event(chunks.body([], usage=usage)))
            await response.write(api_responses.DONE)
        except PipelineError as error:
            await response.write(api_responses.stream_error(str(error)))
        except (ConnectionResetError, asyncio.CancelledError):
            log.info("client went away; its sequence was freed")
            raise
        return response


class StreamScores:
    """The log-probabilities of one streamed choice: each chunk carries those of the tokens
    that arrived since the last one (a chunk's text may lag its tokens while a possible
    stop string is held back; the tokens' texts, joined, are still the choice's text)."""

    def __init__(self, tokenizer: Any, *, chat: bool, top: int = 0) -> None:
        self.scores = Scores()
        self.chat = chat
        self.top = top
        self.shown = 0
        """Tokens whose scores were sent."""
        self.offset = 0
        """Characters of the tokens' texts so far (completions' `text_offset`)."""
        self.decode = lambda ids: str(tokenizer.decode(ids, skip_special_tokens=True))

    def new(self, ids: list[int]) -> dict[str, Any] | None:
        """The logprobs object of the tokens past those already sent (None: no new ones)."""
        if len(ids) <= self.shown:
            return None
        context = max(0, self.shown - TOKEN_WINDOW)
        shares = api_responses.token_texts(self.decode, ids[context:], window=TOKEN_WINDOW)
        shares = shares[self.shown - context :]
        token_scores = self.scores.tokens[self.shown : len(ids)]
        tops = None
        if self.top:
            tops = shown_tops(
                self.decode,
                ids[context:],
                range(self.shown - context, len(ids) - context),
                self.scores.alternatives[self.shown : len(ids)],
                chosen_scores=token_scores,
                with_chosen=not self.chat,
            )
        self.shown = len(ids)
        if self.chat:
            return scoring.chat_logprobs_object(shares, token_scores=token_scores, top=tops)
        scored = scoring.logprobs_object(
            shares, prompt_scores=None, token_scores=token_scores, echo=False, top=tops
        )
        scored["text_offset"] = [self.offset + at for at in scored["text_offset"]]
        self.offset += sum(len(share) for share in shares)
        return scored


TOKEN_WINDOW = 4
"""Tokens decoded before a token to find its text (a UTF-8 character spans at most 4)."""


def shown_tops(
    decode: api_responses.Decode,
    ids: list[int],
    positions: range,
    alternatives: list[list[tuple[int, float]]],
    *,
    chosen_scores: list[float],
    with_chosen: bool,
) -> list[scoring.Top]:
    """The alternatives at `positions` of `ids` as shown: each token's text (its share,
    as `api_responses.token_texts` finds the chosen token's) and log-probability; with
    `with_chosen` (completions) the chosen token is added when it is not among them."""
    out: list[scoring.Top] = []
    for position, top, chosen in zip(positions, alternatives, chosen_scores, strict=True):
        tokens = [token for token, _ in top]
        if with_chosen and ids[position] not in tokens:
            top = [*top, (ids[position], chosen)]
            tokens.append(ids[position])
        texts = api_responses.alternative_texts(decode, ids, position, tokens, window=TOKEN_WINDOW)
        out.append([(text, score) for text, (_, score) in zip(texts, top, strict=True)])
    return out


def choice_logprobs(
    tokenizer: Any,
    generation: api_requests.Generation,
    ids: list[int],
    scores: Scores,
    *,
    chat: bool,
    echo: bool,
) -> dict[str, Any]:
    """A choice's `logprobs` object. The last stage may have scored a token or two past a
    stop string before the generation was cancelled: only the tokens kept are shown."""
    token_scores = scores.tokens[: len(ids)]

    def decode(t: list[int]) -> str:
        return str(tokenizer.decode(t, skip_special_tokens=True))

    shares = api_responses.token_texts(decode, ids, window=TOKEN_WINDOW)
    top = generation.options.top_logprobs
    tops: list[scoring.Top | None] | None = None
    if top:
        tops = list(
            shown_tops(
                decode,
                ids,
                range(len(ids)),
                scores.alternatives[: len(ids)],
                chosen_scores=token_scores,
                with_chosen=not chat,
            )
        )
    if chat:
        return scoring.chat_logprobs_object(
            shares, token_scores=token_scores, top=None if tops is None else [t or () for t in tops]
        )
    if echo:  # the body's text is decode(prompt) + decode(generated): so are the shares
        prompt_ids = generation.prompt_ids

        def decode_prompt(t: list[int]) -> str:
            return str(tokenizer.decode(t))

        prompt = api_responses.token_texts(decode_prompt, prompt_ids)
        shares = [*prompt, *shares]
        if tops is not None:
            prompt_tops: list[scoring.Top | None] = [None]  # the first token has no score
            prompt_tops.extend(
                shown_tops(
                    decode_prompt,
                    prompt_ids,
                    range(1, len(prompt_ids)),
                    scores.prompt_alternatives or [],
                    chosen_scores=scores.prompt or [],
                    with_chosen=True,
                )
            )
            tops = [*prompt_tops, *tops]
    return scoring.logprobs_object(
        shares, prompt_scores=scores.prompt, token_scores=token_scores, echo=echo, top=tops
    )


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
