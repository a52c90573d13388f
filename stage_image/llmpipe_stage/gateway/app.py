"""The stage's HTTP server (aiohttp, on the same event loop as gRPC).

Every stage: `/healthz` (alive; JSON with loading progress), `/readyz` (weights loaded and
serving; on stage 0 also every other stage ready), `/metrics` (Prometheus, through
prometheus_client's aiohttp handler). Stage 0 also serves the OpenAI routes
(`gateway.openai_api`), behind API keys when it has them, on a listener that takes IPv4
and IPv6 on a wildcard address.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from llmpipe_stage import api_keys, api_requests
from llmpipe_stage.gateway.openai_api import OpenAIRoutes
from llmpipe_stage.gateway.protocol import Serving, Status
from llmpipe_stage.gateway.replies import error_response

STATUS_KEY = web.AppKey("status", Status)
ROUTES_KEY = web.AppKey("openai", OpenAIRoutes)
TOKENIZER_NICE = 10
WILDCARDS = ("", "0.0.0.0", "::", "[::]")


@dataclass(frozen=True)
class HttpSettings:
    host: str
    port: int
    model_name: str
    max_prompt_chars: int
    """Stage 0 refuses longer prompts (HTTP 400) before tokenizing them."""
    api_keys: Path | None = None
    """Stage 0: a key file or directory; None serves the OpenAI API without keys."""
    protect_metrics: bool = False
    """Whether /metrics also needs a key (it holds counts, never prompt text)."""


# -- health (every stage) ---------------------------------------------------------------------
async def healthz(request: web.Request) -> web.Response:
    status = request.app[STATUS_KEY]
    progress = status.progress
    failed = progress.phase == "failed"
    body = {
        "status": "failed" if failed else "alive",
        "stage": status.index,
        "phase": progress.phase,
        "loadedTensors": progress.loaded,
        "totalTensors": progress.total,
        "layers": list(status.layers),
        "error": progress.error,
    }
    return web.json_response(body, status=500 if failed else 200)


async def readyz(request: web.Request) -> web.Response:
    ready, reason = await request.app[STATUS_KEY].readiness()
    return web.json_response({"ready": ready, "reason": reason}, status=200 if ready else 503)


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


# -- the listener -----------------------------------------------------------------------------
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


def _add_openai_routes(app: web.Application, status: Status, settings: HttpSettings) -> None:
    executor = ThreadPoolExecutor(
        max_workers=2, thread_name_prefix="tokenize", initializer=yield_the_cpu
    )
    routes = OpenAIRoutes(
        status,
        model_name=settings.model_name,
        max_prompt_chars=settings.max_prompt_chars,
        executor=executor,
    )
    app[ROUTES_KEY] = routes

    async def stop_executor(app: web.Application) -> None:
        executor.shutdown(wait=False, cancel_futures=True)

    app.on_cleanup.append(stop_executor)
    app.router.add_get("/v1/models", routes.models)
    app.router.add_post("/v1/completions", routes.completions)
    app.router.add_post("/v1/chat/completions", routes.chat_completions)


async def start_http(status: Status, settings: HttpSettings) -> web.AppRunner:
    """Serve /healthz, /readyz and /metrics now (loading progress shows), and on stage 0
    the OpenAI routes, which answer 503 until `attach`."""
    middlewares = []
    if status.index == 0 and settings.api_keys is not None:
        ring = api_keys.KeyRing(settings.api_keys)
        ring.keys()  # logs at start when the keys cannot be read
        middlewares.append(require_keys(ring, protect_metrics=settings.protect_metrics))
    app = web.Application(
        client_max_size=api_requests.max_body_bytes(settings.max_prompt_chars),
        middlewares=middlewares,
    )
    app[STATUS_KEY] = status
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", make_aiohttp_handler(status.registry))
    if status.index == 0:
        _add_openai_routes(app, status, settings)
    # A client that disconnects cancels its handler, which frees the sequence everywhere.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site: web.BaseSite
    if settings.host in WILDCARDS:
        site = web.SockSite(runner, dual_stack_socket(settings.port))
    else:
        site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    return runner


def attach(runner: web.AppRunner, serving: Serving) -> None:
    """Stage 0, once loaded: the pipeline and tokenizer behind the OpenAI routes."""
    runner.app[ROUTES_KEY].attach(serving)
