"""One stage process's lifecycle: start, load, serve, stop.

`serve(settings)` starts the gRPC server (`handler.StageServicer`) and the HTTP side
(`gateway`) at once, so /healthz shows loading progress and `Info` answers while the
weights load; then `load` reads this stage's slice and builds its backend complete
(`backend.Head` on stage 0, with the coordinator and the tokenizer behind the OpenAI
routes; `backend.Worker` on every other stage), attaches it, and serves until SIGTERM or
SIGINT. RPC handlers only validate and enqueue; computation never runs on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from llmpipe_stage import api_requests, decode, devices, gateway, kernels, loading, tls
from llmpipe_stage.backend import Head, Ledger, LoadProgress, Parts, Timeouts, Worker
from llmpipe_stage.config import PipelineConfig
from llmpipe_stage.coordinator import CoordinatorSettings
from llmpipe_stage.draft import DraftModel, DraftModelError
from llmpipe_stage.handler import Identity, StageServicer
from llmpipe_stage.metrics import StageMetrics
from llmpipe_stage.peers import CHANNEL_OPTIONS, Peers
from llmpipe_stage.proto import stage_pb2_grpc
from llmpipe_stage.runtime import StageRuntime, give_freed_memory_back

log = logging.getLogger(__name__)

GIL_SWITCH_INTERVAL_S = 0.0005


@dataclass(frozen=True)
class StageSettings:
    stage_index: int
    pipeline: PipelineConfig
    model_dir: Path
    host: str = "0.0.0.0"
    """Bind address for both servers; `llmpipe serve` uses 127.0.0.1."""
    grpc_port: int = 50051
    http_port: int = 8000
    threads: int | None = None
    """torch intra-op threads; None keeps torch's default (all cores)."""
    forward_timeout_s: float = 10.0
    """Deadline of one hop; a neighbour that does not take a micro-batch in time is down."""
    step_timeout_s: float = 30.0
    """Stage 0 parks the sequences whose token has not come back after this long."""
    resume_timeout_s: float = 60.0
    """Stage 0 fails a parked sequence when no healthy chain is back after this long."""
    drain_timeout_s: float = 25.0
    """On SIGTERM, how long the stage keeps serving what it holds (stage 0: its sequences,
    new ones refused; others: until no cache is left): inside the kubelet's default 30 s
    grace period."""
    cache_timeout_s: float = 300.0
    """A KV cache idle this long is freed (its stage 0 is gone or forgot to release it)."""
    attn_implementation: str = "sdpa"
    micro_batches: int | None = None
    """Micro-batches stage 0 keeps in the ring; default one per stage."""
    max_prompt_chars: int = api_requests.DEFAULT_MAX_PROMPT_CHARS
    """Stage 0 refuses longer prompts (HTTP 400) before tokenizing them."""
    api_keys: Path | None = None
    """Stage 0: a key file or directory; None serves the OpenAI API without keys."""
    protect_metrics: bool = False
    """Whether /metrics also needs a key (it holds counts, never prompt text)."""
    draft_model_dir: Path | None = None
    """Stage 0 with `workload.speculation: draft`: the draft model's directory (a small
    model of the same tokenizer, run whole in this process; `llmpipe_stage.draft`)."""
    tls_dir: Path | None = None
    """ca.crt, tls.crt, tls.key for mutual TLS with the other stages; None means plaintext
    gRPC with no authentication (an explicit opt-out, `--plaintext`, for benchmarks)."""

    @property
    def layers(self) -> tuple[int, int]:
        plan = self.pipeline.stages[self.stage_index]
        return plan.layer_start, plan.layer_end

    device: str = "auto"
    """For plans that name no device (`llmpipe serve`, older plans): auto, cpu or cuda. A
    plan stage's own device wins."""

    def placement(self) -> devices.Placement:
        """Where this stage computes and in which dtype (`devices.place`); DeviceError
        when the plan puts it on a GPU that torch does not see."""
        plan = self.pipeline.stages[self.stage_index]
        return devices.place(
            device=plan.device or self.device,
            plan_dtype=plan.dtype,
            pipeline_dtype=self.pipeline.dtype,
        )


class Process:
    """What a stage process has from its first second, before its slice is loaded: the
    gateway's `Status`, the servicer's identity, the peers and the compute thread."""

    def __init__(self, settings: StageSettings) -> None:
        self.settings = settings
        self.index = settings.stage_index
        self.layers = settings.layers
        self.metrics = StageMetrics(stage_index=self.index)
        self.progress = LoadProgress()
        self.ledger = Ledger()
        self.tls = _tls_files(settings)
        self.peers = Peers(settings.pipeline.addresses, index=self.index, tls_files=self.tls)
        # One compute thread: torch runs there, so the event loop keeps moving bytes.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self.placement, self.placement_error = _place(settings)

    @property
    def registry(self) -> CollectorRegistry:
        return self.metrics.registry

    async def readiness(self) -> tuple[bool, str]:
        if not self.progress.ready or self.index != 0:
            return self.progress.ready, f"stage {self.index} is {self.progress.phase}"
        # Asked every time (all stages at once, within the probe's budget): a token that
        # came back a moment ago says nothing about a stage that died since.
        return await self.peers.readiness()

    def identity(self) -> Identity:
        pipeline = self.settings.pipeline
        return Identity(
            index=self.index,
            num_stages=pipeline.num_stages,
            layers=self.layers,
            model_name=pipeline.model_name,
            dtype=self.placement.dtype,
            tls=self.tls,
        )


def _place(settings: StageSettings) -> tuple[devices.Placement, str | None]:
    """The stage's placement, or a CPU stand-in and the reason: a stage whose GPU is
    missing still serves /healthz, which then says why it failed to load."""
    try:
        return settings.placement(), None
    except devices.DeviceError as error:
        return devices.Placement(device=torch.device("cpu"), dtype=torch.float32), str(error)


def _tls_files(settings: StageSettings) -> tls.TlsFiles | None:
    """This stage's TLS files, checked to name this stage (TlsError otherwise)."""
    if settings.tls_dir is None:
        return None
    files = tls.TlsFiles(settings.tls_dir)
    if files.material.identity.index != settings.stage_index:
        raise tls.TlsError(
            f"{settings.tls_dir / 'tls.crt'} names {files.material.identity}, "
            f"but this is stage {settings.stage_index}"
        )
    return files


# -- load --------------------------------------------------------------------------------------
def load_runtime(process: Process) -> StageRuntime:
    """Runs in the compute thread: read this stage's tensors onto its device and build its
    runtime."""
    settings, progress, placement = process.settings, process.progress, process.placement
    if process.placement_error is not None:
        raise loading.LoadError(process.placement_error)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    progress.phase = "loading"
    log.info(
        "stage %d: layers [%d, %d) on %s", process.index, *process.layers, placement.describe()
    )
    if placement.device.type == "cpu":
        log.info("stage %d: decode products: %s", process.index, kernels.status())

    def on_progress(done: int, total: int) -> None:
        progress.loaded, progress.total = done, total

    config = loading.load_config(settings.model_dir)
    last = settings.pipeline.stages[-1]
    if last.layer_end != config.num_hidden_layers:
        raise loading.LoadError(
            f"the plan covers layers [0, {last.layer_end}) but the model has "
            f"{config.num_hidden_layers}"
        )
    plan = settings.pipeline.stages[settings.stage_index]

    # Each layer is fused (quantized, packed) as soon as it is read: the float copy of an
    # int8 stage is one layer at a time.
    def on_layer(layer: torch.nn.Module) -> None:
        fuser(layer)
        # glibc keeps the freed float copies in its heap (its mmap threshold rises after
        # the first large free); handing them back per layer keeps the peak near one layer.
        give_freed_memory_back()

    fuser = decode.Fuser(
        quantize=settings.pipeline.quantization, pack_for=settings.pipeline.max_sequences
    )
    stage_slice = loading.build_slice(
        settings.model_dir,
        layer_start=plan.layer_start,
        layer_end=plan.layer_end,
        has_embedding=plan.has_embedding,
        has_head=plan.has_head,
        dtype=placement.dtype,
        attn_implementation=settings.attn_implementation,
        progress=on_progress,
        device=placement.device,
        on_layer=on_layer,
    )
    limit = min(loading.context_limit(stage_slice.config), settings.pipeline.max_context_tokens)
    return StageRuntime(
        stage_slice,
        context_limit=limit,
        max_sequences=settings.pipeline.max_sequences,
        quantization=settings.pipeline.quantization,
        fused=fuser.layers,
    )


def load_draft_model(settings: StageSettings, runtime: StageRuntime, tokenizer: Any) -> DraftModel:
    """Runs in the compute thread: the draft model, whole, on stage 0's device and dtype,
    after its tokenizer is checked against the model's (DraftModelError otherwise)."""
    if settings.draft_model_dir is None:
        raise DraftModelError(
            "workload.speculation is 'draft' but stage 0 was given no draft model "
            "(--draft-model-dir, or env LLMPIPE_DRAFT_MODEL_DIR)"
        )
    log.info("stage 0: loading the draft model from %s", settings.draft_model_dir)
    return DraftModel.load(
        settings.draft_model_dir,
        target_dir=settings.model_dir,
        dtype=runtime.stage.dtype,
        device=runtime.stage.device,
        context_limit=runtime.context_limit,
        max_sequences=settings.pipeline.max_sequences,
        target_tokenizer=tokenizer,
    )


def _parts(process: Process, runtime: StageRuntime) -> Parts:
    settings = process.settings
    return Parts(
        runtime=runtime,
        executor=process.executor,
        metrics=process.metrics,
        peers=process.peers,
        ledger=process.ledger,
        timeouts=Timeouts(forward_s=settings.forward_timeout_s, cache_s=settings.cache_timeout_s),
    )


async def start_head(process: Process, runtime: StageRuntime) -> tuple[Head, gateway.Serving]:
    """Stage 0, loaded: its tokenizer, and the coordinator behind the OpenAI routes."""
    from transformers import AutoTokenizer

    settings = process.settings
    loop = asyncio.get_running_loop()
    tokenizer = await loop.run_in_executor(
        process.executor, AutoTokenizer.from_pretrained, str(settings.model_dir)
    )
    config = runtime.stage.config
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
    coordinator = CoordinatorSettings(
        num_stages=settings.pipeline.num_stages,
        max_sequences=settings.pipeline.max_sequences,
        context_limit=runtime.context_limit,
        eos_token_ids=eos_ids,
        step_timeout_s=settings.step_timeout_s,
        resume_timeout_s=settings.resume_timeout_s,
        micro_batches=settings.micro_batches,
        prefill_chunk_tokens=settings.pipeline.prefill_chunk_tokens,
        prefill_tokens_in_flight=settings.pipeline.prefill_tokens_in_flight,
        speculation=settings.pipeline.speculation,
        max_draft_tokens=settings.pipeline.max_draft_tokens,
    )
    draft_model = None
    if settings.pipeline.speculation == "draft":
        draft_model = await loop.run_in_executor(
            process.executor, load_draft_model, settings, runtime, tokenizer
        )
    head = Head(_parts(process, runtime), coordinator=coordinator, draft_model=draft_model)
    serving = gateway.Serving(
        generations=head.coordinator,
        tokenizer=tokenizer,
        context_limit=runtime.context_limit,
        eos_token_ids=eos_ids,
    )
    return head, serving


async def start_backend(
    process: Process, runtime: StageRuntime, *, servicer: StageServicer, runner: web.AppRunner
) -> tuple[Head | Worker, list[asyncio.Task[None]]]:
    """Build the loaded stage's backend, attach it to both servers, start its loops."""
    if process.index == 0:
        head, serving = await start_head(process, runtime)
        servicer.attach(head)
        gateway.attach(runner, serving)
        loops = [head.coordinator.run(), head.sweep()]
        backend: Head | Worker = head
    else:
        is_last = process.index == process.settings.pipeline.num_stages - 1
        backend = worker = Worker(_parts(process, runtime), is_last=is_last)
        servicer.attach(worker)
        loops = [worker.work(), worker.sweep()]
    return backend, [asyncio.ensure_future(loop) for loop in loops]


DRAIN_QUIET_S = 2.0
"""A stage past 0 leaves once it held no cache this long (a prefill may be on its way)."""


async def drain(backend: Head | Worker, *, timeout_s: float) -> None:
    """SIGTERM: keep serving what this stage holds, up to `timeout_s`. Stage 0 refuses new
    sequences (503) and waits for its own; every other stage waits until it has held no
    KV cache for DRAIN_QUIET_S (stage 0 frees each sequence everywhere when it ends)."""
    deadline = time.monotonic() + timeout_s
    quiet_since = time.monotonic()
    if isinstance(backend, Head):
        backend.coordinator.accepting = False
    while time.monotonic() < deadline:
        if isinstance(backend, Head):
            if not backend.coordinator.sequences and not backend.coordinator.parked:
                return
        elif backend.runtime.caches:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= DRAIN_QUIET_S:
            return
        await asyncio.sleep(0.1)
    log.warning("stage %d: drain bound of %g s passed; stopping", backend.index, timeout_s)


# -- start, serve, stop -----------------------------------------------------------------------
async def start_grpc(
    process: Process, servicer: StageServicer
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """The gRPC server (stage RPCs and the standard health service), started."""
    settings = process.settings
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    stage_pb2_grpc.add_StageServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    address = f"{settings.host}:{settings.grpc_port}"
    if process.tls is None:
        log.warning("stage %d: plaintext gRPC (--plaintext): stage links are open", process.index)
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, tls.server_credentials(process.tls))
    if bound == 0:
        raise OSError(f"cannot bind gRPC port {address}")
    await server.start()
    return server, health_servicer


def http_settings(settings: StageSettings) -> gateway.HttpSettings:
    return gateway.HttpSettings(
        host=settings.host,
        port=settings.http_port,
        model_name=settings.pipeline.model_name,
        max_prompt_chars=settings.max_prompt_chars,
        api_keys=settings.api_keys,
        protect_metrics=settings.protect_metrics,
    )


def stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def serve(settings: StageSettings) -> int:
    """Run one stage until SIGTERM/SIGINT. Returns the process exit code."""
    # The compute thread holds the GIL for long stretches of Python (per-layer module
    # calls); a shorter switch interval lets the event loop take and pass on micro-batches
    # sooner (+4-38 % decode throughput over 4 local stages in A/B runs).
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    process = Process(settings)
    servicer = StageServicer(process.identity(), progress=process.progress, ledger=process.ledger)
    server, health_servicer = await start_grpc(process, servicer)
    runner = await gateway.start_http(process, http_settings(settings))
    log.info(
        "stage %d: gRPC on %s:%d, HTTP on %s:%d",
        process.index,
        settings.host,
        settings.grpc_port,
        settings.host,
        settings.http_port,
    )
    stop = stop_on_signals()
    tasks: list[asyncio.Task[None]] = []
    code = 0
    try:
        loop = asyncio.get_running_loop()
        runtime = await loop.run_in_executor(process.executor, load_runtime, process)
        backend, tasks = await start_backend(process, runtime, servicer=servicer, runner=runner)
        process.progress.phase = "ready"
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "stage %d ready: layers [%d, %d) in %.1f s",
            process.index,
            *process.layers,
            time.monotonic() - process.progress.started,
        )
        await stop.wait()
        log.info("stage %d: draining (up to %g s)", process.index, settings.drain_timeout_s)
        await drain(backend, timeout_s=settings.drain_timeout_s)
    except (loading.LoadError, OSError, ValueError) as error:
        process.progress.phase, process.progress.error = "failed", str(error)
        log.error("stage %d failed to start: %s", process.index, error)
        code = 1
    finally:
        for task in tasks:
            task.cancel()
        await runner.cleanup()
        await server.stop(grace=1.0)
        await process.peers.close()
        process.executor.shutdown(wait=False, cancel_futures=True)
    return code
