"""The node probe: what one node really offers a stage, measured, bounded, with no API rights.

`python -m llmpipe_stage.probe` runs in the stage image (the chart's opt-in DaemonSet, one
pod per node, or any process in an emulated node). It measures:

- compute: dense matrix-product TFLOP/s at the stage's dtype on the device a stage would
  use (the CPU threads the pod may run: a decode micro-batch's shape; a GPU: a square
  product), the rate `llmpipe.io/tflops` stands for;
- memory bandwidth: a streaming read (`sum`) of a buffer much larger than the caches, the
  rate at which a decode step streams its weights (`llmpipe.io/memory-bandwidth-gbps`);
- the product curve (CPU, version 3): seconds per weight byte of the stage runtime's own
  decode step (`StageRuntime.run`: the fused, packed or quantized products the stages
  run, with the norms, rotary and attention whose work grows with the layer's width) of 1
  to 32 tokens over decoder layers of the model's shape (`--layer-shape`), less the
  fixed costs below (`productSecondsPerByte`): on a CPU a few tokens cost about the same
  per call, which no roofline of the two figures above describes;
- fixed costs (version 2): the stage runtime's own decode step (`StageRuntime.run`, the
  fused decode path) over a tiny decoder slice (width 32, so its products are negligible)
  at 1 and 5 layers and 1 and 8 tokens gives seconds per layer per step
  (`layerStepSeconds`), per layer per token (`layerTokenSeconds`) and per step
  (`stepSeconds`); a loopback gRPC call (grpc.aio, as the stages use it) of a 16 KiB
  micro-batch gives the CPU time of one message hop (`hopSeconds`);
- links, when asked: bulk TCP transfer rate and ping-pong round-trip time to another
  probe's link port, never more than `max_bytes` (a few MB) per pair per run.

It never talks to the API server: the operator reads `GET /facts` from each probe, asks
one probe at a time to `POST /links` to another (so no two measured links share a node at
the same moment), and writes the results to the Nodes itself (docs/operator.md,
"Measured node facts"). Each measurement is bounded in time (`budget_seconds`) and bytes.

HTTP endpoints (port `--port`): `GET /healthz`, `GET /facts` (503 until the first
measurement ends), `POST /links` with `{"peer": "host:port"}`. The link port (`--link-port`)
takes the peers' transfers.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import http.server
import json
import logging
import os
import socket
import socketserver
import statistics
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("llmpipe.probe")

PROBE_VERSION = "3"
"""Bumped when a method changes, so an operator can tell figures of different methods apart."""

MAX_LINK_BYTES = 4 * 2**20
"""Bytes one link measurement may send at most (plus the 256 KiB sizing transfer)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Budget:
    """How long each local measurement may take; the defaults keep a probe run under 10 s."""

    compute_seconds: float = 2.0
    """Two seconds span twenty CFS periods, so a CPU quota shows as its average rate."""
    memory_seconds: float = 2.0
    """Same reason; each pass over the buffer is one sample."""
    memory_bytes: int = 256 * 2**20
    """Far beyond any last-level cache, so the read streams from DRAM (or HBM)."""
    products_seconds: float = 2.0
    """Spread over the curve's eight token counts: a quarter of a second each (25 CFS
    periods of 10 ms), but at least three steps per count."""
    layer_seconds: float = 1.5
    """Spread over the decode step's three shapes."""
    hop_seconds: float = 0.5
    """Hundreds of loopback calls at a full core, tens at a tenth of one."""

    @classmethod
    def scaled(cls, seconds: float) -> Budget:
        """Every measurement's time in proportion to `seconds` (2: the defaults)."""
        return cls(
            compute_seconds=seconds,
            memory_seconds=seconds,
            products_seconds=seconds,
            layer_seconds=0.75 * seconds,
            hop_seconds=0.25 * seconds,
        )


# --- local measurements ------------------------------------------------------------------


def _timed(work: Callable[[], object], sync: Callable[[], None], *, seconds: float) -> float:
    """Seconds per call of `work`, run repeatedly for about `seconds` after a warm-up."""
    work()
    sync()
    calls, started = 0, time.perf_counter()
    while True:
        work()
        calls += 1
        sync()
        took = time.perf_counter() - started
        if took >= seconds:
            return took / calls


CPU_SHAPE = (16, 1024, 1024)
"""(tokens, in, out) of the CPU product: a decode micro-batch against a 4 MiB (fp32) weight
matrix. A CPU decode step multiplies a few tokens by each weight matrix, which runs at a
third of a square product's rate (docs/benchmarks.md): this is the rate stages see."""
GPU_SHAPE = (4096, 4096, 4096)
"""A GPU's decode step is bound by memory bandwidth, which the cost model takes from the
bandwidth figure; its FLOP figure is the device's dense rate, a square product's."""


def measure_compute(
    *, dtype: str, device: str, seconds: float, shape: tuple[int, int, int] | None = None
) -> dict[str, Any]:
    """TFLOP/s of `linear` (2 m k n FLOPs: m tokens, a k -> n weight) at `dtype` on
    `device`, the product a stage's layers are made of."""
    import torch

    tokens, width, out = shape or (GPU_SHAPE if device.startswith("cuda") else CPU_SHAPE)
    torch_dtype = getattr(torch, dtype)
    x = torch.randn(tokens, width, device=device).to(torch_dtype)  # [m, k]
    weight = torch.randn(out, width, device=device).to(torch_dtype)  # [n, k]
    linear = torch.nn.functional.linear
    per_call = _timed(lambda: linear(x, weight), _sync(device), seconds=seconds)
    threads = torch.get_num_threads() if device == "cpu" else 0
    return {
        "tflops": 2 * tokens * width * out / per_call / 1e12,
        "method": f"{dtype} linear {tokens} tokens x {width}->{out} on {device}"
        + (f", {threads} threads" if threads else "")
        + f", {seconds:g} s",
    }


def measure_memory_bandwidth(*, device: str, seconds: float, size_bytes: int) -> dict[str, Any]:
    """Streaming-read GB/s: one `sum` over a float32 buffer of `size_bytes` reads it once."""
    import torch

    buffer = torch.ones(size_bytes // 4, dtype=torch.float32, device=device)  # [n]
    per_call = _timed(lambda: buffer.sum(), _sync(device), seconds=seconds)
    return {
        "memoryBandwidthGBps": size_bytes / per_call / 1e9,
        "method": f"float32 sum over {size_bytes // 2**20} MiB on {device}, {seconds:g} s",
    }


PRODUCT_TOKENS = (1, 2, 4, 8, 12, 16, 24, 32)
"""Token counts of the product curve: the micro-batches of S / K tokens decode runs. 12
and 24 are measured, not interpolated: a product of 12 tokens cost 45 % more per byte
than one of 16 in one run (docs/benchmarks.md), and 24 is a common S."""
PRODUCT_WORKING_SET = 64 * 2**20
"""The curve's layers hold at least this many weight bytes (and at least two layers), so
each step streams them from memory, as a stage's layers do."""


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """A Llama-style decoder layer's shape: what the product curve is measured on."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int

    @classmethod
    def parse(cls, text: str) -> LayerShape:
        """`HIDDEN,INTERMEDIATE,HEADS,KV_HEADS`, e.g. `2048,5632,32,4` (TinyLlama)."""
        parts = text.split(",")
        if len(parts) != 4 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"a layer shape is HIDDEN,INTERMEDIATE,HEADS,KV_HEADS, got {text!r}")
        hidden, intermediate, heads, kv_heads = (int(p) for p in parts)
        if hidden % heads or heads % kv_heads or (hidden // heads) % 2:
            raise ValueError(
                f"layer shape {text!r}: heads must divide hidden into an even head size, "
                "and kv_heads must divide heads"
            )
        return cls(hidden, intermediate, heads, kv_heads)

    def text(self) -> str:
        return f"{self.hidden},{self.intermediate},{self.heads},{self.kv_heads}"

    def weight_bytes(self, element_bytes: int) -> int:
        """One layer's projection weights (q|k|v, o, gate|up, down): what r(t) is per."""
        head_dim = self.hidden // self.heads
        q, kv = self.heads * head_dim, self.kv_heads * head_dim
        params = self.hidden * (q + 2 * kv) + q * self.hidden + 3 * self.hidden * self.intermediate
        return params * element_bytes

    def layers(self, element_bytes: int) -> int:
        """Layers the curve runs over: PRODUCT_WORKING_SET of weights, at least two."""
        per_layer = self.weight_bytes(element_bytes)
        return max(2, -(-PRODUCT_WORKING_SET // per_layer))


DEFAULT_LAYER_SHAPE = LayerShape(hidden=1024, intermediate=2816, heads=16, kv_heads=8)
"""The shape measured when none is given (47 MiB per float32 layer, two layers): a small
model's. Give the served model's (`--layer-shape`, the chart's `probe.layerShape`): the
work beside the products grows with the width slower than the weights do, so a narrower
model costs more per byte than a wider one (docs/planning.md, "Fixed costs")."""


def measure_products(
    *,
    dtype: str,
    device: str,
    seconds: float,
    shape: LayerShape = DEFAULT_LAYER_SHAPE,
    fixed: dict[str, float] | None = None,
) -> dict[str, Any]:
    """r(t), seconds per weight byte, for t in PRODUCT_TOKENS: the stage runtime's decode
    step of t sequences over `shape.layers()` decoder layers of `shape`, less the fixed
    costs `fixed` (f, g, h of `measure_layer_step`, which the cost model adds on its own),
    divided by the layers' projection bytes. What the stages' products cost, on their own
    kernels (fused q|k|v and gate|up, packed 16-bit weights), with everything else that
    grows with the layer's width counted per byte; the KV cache read at the curve's short
    contexts (positions 1 to at most 64) is in it too, a few per cent of a step."""
    fixed = fixed or {}
    element = _element_bytes(dtype)
    layers = shape.layers(element)
    layer_bytes = shape.weight_bytes(element)
    f = fixed.get("layerStepSeconds", 0.0)
    g = fixed.get("layerTokenSeconds", 0.0)
    h = fixed.get("stepSeconds", 0.0)
    each = seconds / len(PRODUCT_TOKENS)
    steps = _decode_steps(
        layers=layers, token_counts=PRODUCT_TOKENS, dtype=dtype, device=device, seconds=each,
        shape=shape, prompt=1,
    )  # fmt: skip
    curve = {}
    for tokens, step in steps.items():
        beside = h + layers * (f + g * tokens)
        # noise can make the difference tiny or negative: never below a tenth of the step
        curve[str(tokens)] = max(step - beside, 0.1 * step) / (layers * layer_bytes)
    return {
        "productSecondsPerByte": curve,
        "method": f"{dtype} StageRuntime decode step, {layers} layers of shape "
        f"{shape.text()} (hidden, intermediate, heads, kv heads; {layer_bytes // 2**20} MiB "
        f"each), less f, g, h, on {device}, t in {list(PRODUCT_TOKENS)}, {seconds:g} s",
    }


def _element_bytes(dtype: str) -> int:
    import torch

    return int(torch.empty(0, dtype=getattr(torch, dtype)).element_size())


LAYER_WIDTH = 32
"""A decoder layer this narrow computes next to nothing (37 KiB of weights in float32):
its step time is the layer's fixed cost."""


def measure_layer_step(*, dtype: str, device: str, seconds: float) -> dict[str, Any]:
    """f, g, h of the stage runtime's decode step: t(layers, tokens) at (1, 1), (5, 1),
    (5, 8); f = (t(5,1) - t(1,1)) / 4, g = (t(5,8) - t(5,1)) / (5 x 7), h = t(1,1) - f."""
    each = seconds / 3
    one = _decode_step_seconds(layers=1, tokens=1, dtype=dtype, device=device, seconds=each)
    five = _decode_step_seconds(layers=5, tokens=1, dtype=dtype, device=device, seconds=each)
    wide = _decode_step_seconds(layers=5, tokens=8, dtype=dtype, device=device, seconds=each)
    layer = max(0.0, (five - one) / 4)
    return {
        "layerStepSeconds": layer,
        "layerTokenSeconds": max(0.0, (wide - five) / (5 * 7)),
        "stepSeconds": max(0.0, one - layer),
        "method": f"{dtype} StageRuntime decode step, width {LAYER_WIDTH}, (layers, tokens) "
        f"(1, 1) {one * 1e3:.3f} ms, (5, 1) {five * 1e3:.3f} ms, (5, 8) {wide * 1e3:.3f} ms "
        f"on {device}, {seconds:g} s",
    }


def _decode_step_seconds(
    *, layers: int, tokens: int, dtype: str, device: str, seconds: float
) -> float:
    """Mean seconds of one decode step of `tokens` sequences through a `layers`-layer slice
    of a tiny random Llama (width LAYER_WIDTH), on the stage runtime's own path."""
    tiny = LayerShape(hidden=LAYER_WIDTH, intermediate=2 * LAYER_WIDTH, heads=2, kv_heads=1)
    return _decode_steps(
        layers=layers, token_counts=(tokens,), dtype=dtype, device=device, seconds=seconds,
        shape=tiny, prompt=8,
    )[tokens]  # fmt: skip


def _decode_steps(
    *,
    layers: int,
    token_counts: tuple[int, ...],
    dtype: str,
    device: str,
    seconds: float,
    shape: LayerShape,
    prompt: int,
) -> dict[int, float]:
    """Mean seconds of one decode step of t sequences, for each t in `token_counts`,
    through a `layers`-layer slice of a random Llama of `shape`, on the stage runtime's own
    path (fused at load, as a stage's): each t runs for `seconds` and at least 3 steps.
    The mean, not the median: under a CPU quota the throttled steps are part of the rate."""
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama import modeling_llama

    from llmpipe_stage import loading, runtime, wire

    context = 96 if shape.hidden <= LAYER_WIDTH else prompt + 64
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=context + 32,
    )
    config._attn_implementation = "sdpa"
    torch_dtype, where = getattr(torch, dtype), torch.device(device)
    modules = torch.nn.ModuleList(
        modeling_llama.LlamaDecoderLayer(config, layer_idx=i).to(where, torch_dtype).eval()
        for i in range(layers)
    )
    stage = loading.StageSlice(
        config=config,
        layer_start=0,
        layer_end=layers,
        layers=modules,
        rotary=modeling_llama.LlamaRotaryEmbedding(config=config).eval().to(where),
        embed=None,
        norm=None,
        head_weight=None,
        dtype=torch_dtype,
        device=where,
    )
    stage_runtime = runtime.StageRuntime(
        stage, context_limit=context, max_sequences=max(token_counts)
    )
    sync = _sync(device)
    out = {}
    with torch.inference_mode():
        for tokens in token_counts:
            steps, spent = 0, 0.0
            while spent < seconds or steps < 3:
                ids = list(range(tokens))
                stage_runtime.run(
                    [wire.Step(i, 0, prompt) for i in ids],
                    torch.randn(tokens * prompt, shape.hidden, dtype=torch_dtype, device=where),
                )
                for position in range(prompt, context):  # [tokens, hidden]: one micro-batch
                    hidden = torch.randn(tokens, shape.hidden, dtype=torch_dtype, device=where)
                    started = time.perf_counter()
                    stage_runtime.run([wire.Step(i, position, 1) for i in ids], hidden)
                    sync()
                    spent += time.perf_counter() - started
                    steps += 1
                    if spent >= seconds and steps >= 3:
                        break
                stage_runtime.release(ids)
            out[tokens] = spent / steps
    return out


HOP_BYTES = 16 * 2**10
"""A micro-batch of a few tokens' hidden states; the link's rate prices the bytes."""


def measure_hop(*, seconds: float) -> dict[str, Any]:
    """CPU seconds of one message hop: a loopback unary grpc.aio call of HOP_BYTES with an
    empty reply, client and server in this process (a stage receives one micro-batch and
    sends one per step: both sides of a call)."""
    import asyncio

    per_call = asyncio.run(_hop_calls(seconds))
    return {
        "hopSeconds": per_call,
        "method": f"grpc.aio loopback unary call, {HOP_BYTES // 1024} KiB request, "
        f"empty reply, plaintext, {seconds:g} s",
    }


async def _hop_calls(seconds: float) -> float:
    import grpc

    def echo(request: bytes, context: Any) -> bytes:
        return b""

    handler = grpc.method_handlers_generic_handler(
        "llmpipe.Probe", {"Hop": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/llmpipe.Probe/Hop")
            payload = os.urandom(HOP_BYTES)
            for _ in range(5):  # warm-up: connection, first-call paths
                await call(payload)
            calls, started = 0, time.perf_counter()
            while True:
                await call(payload)
                calls += 1
                took = time.perf_counter() - started
                if took >= seconds and calls >= 5:
                    return took / calls
    finally:
        await server.stop(None)


def _sync(device: str) -> Callable[[], None]:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


def measure_node(
    *, dtype: str, device: str, budget: Budget, shape: LayerShape = DEFAULT_LAYER_SHAPE
) -> dict[str, Any]:
    """The node's facts in the `llmpipe.io/measured` shape (less the links)."""
    compute = measure_compute(dtype=dtype, device=device, seconds=budget.compute_seconds)
    memory = measure_memory_bandwidth(
        device=device, seconds=budget.memory_seconds, size_bytes=budget.memory_bytes
    )
    layer = measure_layer_step(dtype=dtype, device=device, seconds=budget.layer_seconds)
    hop = measure_hop(seconds=budget.hop_seconds)
    facts: dict[str, Any] = {
        "probeVersion": PROBE_VERSION,
        "measuredAt": now_text(),
        "device": device,
        "dtype": dtype,
        "tflops": round(compute["tflops"], 6),
        "memoryBandwidthGBps": round(memory["memoryBandwidthGBps"], 3),
        "layerStepSeconds": _sig(layer["layerStepSeconds"]),
        "layerTokenSeconds": _sig(layer["layerTokenSeconds"]),
        "stepSeconds": _sig(layer["stepSeconds"]),
        "hopSeconds": _sig(hop["hopSeconds"]),
        "method": {
            "tflops": compute["method"],
            "memoryBandwidthGBps": memory["method"],
            "layerStepSeconds": layer["method"],
            "hopSeconds": hop["method"],
        },
    }
    if not device.startswith("cuda"):  # a GPU's decode step: the roofline of its figures
        products = measure_products(
            dtype=dtype,
            device=device,
            seconds=budget.products_seconds,
            shape=shape,
            fixed={k: float(facts[k]) for k in FIXED_KEYS},
        )
        curve = products["productSecondsPerByte"]
        facts["productSecondsPerByte"] = {t: _sig(r) for t, r in curve.items()}
        facts["method"]["productSecondsPerByte"] = products["method"]
    return facts


FIXED_KEYS = ("layerStepSeconds", "layerTokenSeconds", "stepSeconds")
"""f, g, h: what the product curve is measured beside."""


def _sig(value: float) -> float:
    """Four significant digits: the figures are not more precise than that."""
    return float(f"{value:.4g}")


def now_text() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- links: the peer side ----------------------------------------------------------------
#
# One TCP connection per measurement. The client sends one op byte:
#   b"P" + uint32 n      n one-byte ping-pongs (the server echoes each byte)
#   b"B" + uint64 size   `size` bytes; the server answers float64 seconds from the end of
#                        the first read to the last byte, and uint64 bytes received in it
# The receiver times the bulk transfer, so the sender's socket buffer does not count.

_PING = struct.Struct("!I")
_BULK = struct.Struct("!Q")
_BULK_REPLY = struct.Struct("!dQ")
_CHUNK = 64 * 2**10


class _LinkHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        conn: socket.socket = self.request
        conn.settimeout(60)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        op = _read_exact(conn, 1)
        if op == b"P":
            (count,) = _PING.unpack(_read_exact(conn, _PING.size))
            for _ in range(min(count, 1000)):
                conn.sendall(_read_exact(conn, 1))
        elif op == b"B":
            (size,) = _BULK.unpack(_read_exact(conn, _BULK.size))
            size = min(size, MAX_LINK_BYTES + 2**20)
            first = conn.recv(min(_CHUNK, size))
            started, counted, left = time.perf_counter(), 0, size - len(first)
            while left > 0:
                data = conn.recv(min(_CHUNK, left))
                if not data:
                    raise ConnectionError("peer closed during the transfer")
                counted += len(data)
                left -= len(data)
            conn.sendall(_BULK_REPLY.pack(time.perf_counter() - started, counted))


def _read_exact(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        data += chunk
    return data


class LinkServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str, port: int) -> None:
        super().__init__((host, port), _LinkHandler)


# --- links: the measuring side -----------------------------------------------------------


def measure_rtt(host: str, port: int, *, pings: int = 20) -> float:
    """Median round-trip milliseconds of one-byte ping-pongs on one TCP connection."""
    with socket.create_connection((host, port), timeout=10) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sendall(b"P" + _PING.pack(pings))
        samples = []
        for _ in range(pings):
            started = time.perf_counter()
            conn.sendall(b"x")
            _read_exact(conn, 1)
            samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1000


def bulk_transfer(host: str, port: int, size: int) -> tuple[float, int]:
    """(seconds, bytes) the receiver timed for a `size`-byte transfer."""
    payload = os.urandom(_CHUNK)
    with socket.create_connection((host, port), timeout=60) as conn:
        conn.sendall(b"B" + _BULK.pack(size))
        left = size
        while left > 0:
            conn.sendall(payload[: min(_CHUNK, left)])
            left -= min(_CHUNK, left)
        seconds, counted = _BULK_REPLY.unpack(_read_exact(conn, _BULK_REPLY.size))
    return float(seconds), int(counted)


def measure_link(
    host: str, port: int, *, max_bytes: int = MAX_LINK_BYTES, target_seconds: float = 1.0
) -> dict[str, Any]:
    """Mbit/s and RTT to a peer's link port: a 256 KiB transfer sizes the real one, which
    lasts about `target_seconds` and never exceeds `max_bytes`."""
    rtt_ms = measure_rtt(host, port)
    sizing = 256 * 2**10
    seconds, counted = bulk_transfer(host, port, sizing)
    rate = counted / max(seconds, 1e-6)  # bytes/s
    size = int(min(max(rate * target_seconds, sizing), max(max_bytes, sizing)))
    seconds, counted = bulk_transfer(host, port, size)
    return {
        "mbps": round(counted * 8 / max(seconds, 1e-6) / 1e6, 3),
        "rttMs": round(rtt_ms, 3),
        "bytes": sizing + size,
        "measuredAt": now_text(),
    }


# --- the probe's HTTP side (what the operator reads) ---------------------------------------


class Probe:
    """The latest facts of this node, re-measured every `interval_seconds`."""

    def __init__(
        self,
        *,
        dtype: str,
        device: str,
        budget: Budget,
        link_port: int,
        threads: int | None,
        shape: LayerShape = DEFAULT_LAYER_SHAPE,
    ) -> None:
        self.dtype, self.device, self.budget, self.link_port = dtype, device, budget, link_port
        self.threads, self.shape = threads, shape
        self.facts: dict[str, Any] | None = None
        self.link_lock = threading.Lock()

    def measure(self) -> None:
        """Runs in the measuring thread, which sets the thread count again: set only in the
        main thread, this thread measured 3.6x less under a CPU quota of 0.2 core
        (docs/benchmarks.md, "Plans from measured facts")."""
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        facts = measure_node(
            dtype=self.dtype, device=self.device, budget=self.budget, shape=self.shape
        )
        facts["linkPort"] = self.link_port
        self.facts = facts
        log.info("measured %s", json.dumps(facts))

    def run_schedule(self, interval_seconds: float) -> None:
        while True:
            self.measure()
            time.sleep(interval_seconds)

    def link(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        peer = str(body.get("peer", ""))
        host, _, port = peer.rpartition(":")
        if not host or not port.isdigit():
            return 400, {"error": "peer must be host:port"}
        max_bytes = min(int(body.get("maxBytes", MAX_LINK_BYTES)), MAX_LINK_BYTES)
        if not self.link_lock.acquire(blocking=False):
            return 429, {"error": "a link measurement is already running"}
        try:
            return 200, measure_link(host.strip("[]"), int(port), max_bytes=max_bytes)
        except OSError as error:
            return 502, {"error": f"link to {peer}: {error}"}
        finally:
            self.link_lock.release()


def http_handler(probe: Probe) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/healthz":
                self._reply(200, {"ok": True})
            elif self.path == "/facts":
                facts = probe.facts
                self._reply(200, facts) if facts else self._reply(503, {"error": "measuring"})
            else:
                self._reply(404, {"error": "not found"})

        def do_POST(self) -> None:
            if self.path != "/links":
                self._reply(404, {"error": "not found"})
                return
            length = min(int(self.headers.get("Content-Length") or 0), 4096)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except json.JSONDecodeError:
                self._reply(400, {"error": "body must be JSON"})
                return
            self._reply(*probe.link(body if isinstance(body, dict) else {}))

        def _reply(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug(format, *args)

    return Handler


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="llmpipe-probe", description=__doc__)
    parser.add_argument("--host", default="0.0.0.0", help="bind address (0.0.0.0)")
    parser.add_argument("--port", type=int, default=8090, help="HTTP port (8090)")
    parser.add_argument("--link-port", type=int, default=8091, help="link port (8091)")
    parser.add_argument("--dtype", default="float32", help="the stages' dtype (float32)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (torch's choice)")
    parser.add_argument(
        "--interval", type=float, default=3600.0, help="seconds between re-measurements (3600)"
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement (2)")
    parser.add_argument(
        "--layer-shape",
        type=LayerShape.parse,
        default=DEFAULT_LAYER_SHAPE,
        metavar="H,I,HEADS,KV",
        help="decoder layer the product curve runs on: the served model's hidden size, "
        f"intermediate size, heads, kv heads ({DEFAULT_LAYER_SHAPE.text()})",
    )
    parser.add_argument("--once", action="store_true", help="measure, print JSON, exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    budget = Budget.scaled(args.seconds)
    if args.once:
        facts = measure_node(
            dtype=args.dtype, device=args.device, budget=budget, shape=args.layer_shape
        )
        print(json.dumps(facts))
        return
    links = LinkServer(args.host, args.link_port)
    threading.Thread(target=links.serve_forever, name="links", daemon=True).start()
    probe = Probe(
        dtype=args.dtype,
        device=args.device,
        budget=budget,
        link_port=args.link_port,
        threads=args.threads,
        shape=args.layer_shape,
    )
    threading.Thread(
        target=probe.run_schedule, args=(args.interval,), name="measure", daemon=True
    ).start()
    server = http.server.ThreadingHTTPServer((args.host, args.port), http_handler(probe))
    print(f"llmpipe probe: http {args.host}:{args.port}, links {args.link_port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
