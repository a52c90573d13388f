"""Data-plane benchmark: per-hop overhead, bytes on the wire, pipeline throughput.

    make bench            # or: PYTHONPATH=.:operator:stage_image python bench/dataplane.py

1. Per hop: serialize a 4096-wide fp16 hidden state (one token), send it with the stage's
   Forward RPC (grpc.aio, loopback) to a process that deserializes it, wait for the ack;
   over mutual TLS with the stage's per-RPC identity check (the default) and over
   plaintext gRPC (`--plaintext`), alternating in rounds so both see the same load.
2. Bytes on the wire per token per hop, for the hidden state and for the token-id return hop.
3. Decode throughput with 1, 4 and 16 sequences in flight over 1-4 stage processes
   (`llmpipe serve`, one torch thread per stage) versus single-process `generate` at the
   same batch (one torch thread), printed side by side with the ratio; on the synthetic
   model (random Llama, 8 layers, hidden 512) and on the real default model
   (SmolLM2-135M-Instruct from its GGUF file, 30 layers, hidden 576), `--model` picks.
Figures are printed, never asserted; docs/benchmarks.md records a run.
"""

from __future__ import annotations

import sys

# bench/ also holds operator.py, which would shadow the stdlib `operator` module that
# argparse, random, ... import: drop the script's folder from the import path first.
if sys.path and sys.path[0].rstrip("/").endswith("bench"):
    del sys.path[0]

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "stage_image"), str(ROOT / "operator")]

import grpc  # noqa: E402
import torch  # noqa: E402

from llmpipe_stage import tls, wire  # noqa: E402
from llmpipe_stage.proto import stage_pb2, stage_pb2_grpc  # noqa: E402

HIDDEN = 4096


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_block(count: int, *, avoid: range = range(0)) -> int:
    """A base port such that base .. base+count-1 are all free (serve uses consecutive ports)."""
    for base in range(20000, 30000, 97):
        ports = range(base, base + count)
        if any(p in avoid for p in ports):
            continue
        try:
            for port in ports:
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free block of ports in 20000-30000")


# -- 1. per-hop overhead ------------------------------------------------------------------------
class SinkServicer(stage_pb2_grpc.StageServicer):
    """The receiving half of a hop: check the caller (with TLS), deserialize and validate
    like a stage, then ack."""

    def __init__(self, files: tls.TlsFiles | None) -> None:
        self.files = files
        self.peers = tls.PeerIdentities()

    async def Forward(self, request, context):
        if self.files is not None:  # what StageServicer._authorize does per RPC
            peer = self.peers.of(context)
            me = self.files.material.identity
            if peer is None or tls.allowed("Forward", peer=peer, me=me, num_stages=2):
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, "refused")
        wire.decode_activations(request, hidden_size=HIDDEN, dtype=torch.float16)
        return stage_pb2.Ack()


async def run_sink(port: int, tls_dir: str | None) -> None:
    files = tls.TlsFiles(Path(tls_dir)) if tls_dir else None
    server = grpc.aio.server()
    stage_pb2_grpc.add_StageServicer_to_server(SinkServicer(files), server)
    if files is None:
        server.add_insecure_port(f"127.0.0.1:{port}")
    else:
        server.add_secure_port(f"127.0.0.1:{port}", tls.server_credentials(files))
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


def open_channel(port: int, tls_dir: Path | None) -> grpc.aio.Channel:
    if tls_dir is None:
        return grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    credentials = tls.channel_credentials(tls.TlsFiles(tls_dir).material)
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials)


async def time_hops(
    port: int, *, batch: int, calls: int, tls_dir: Path | None = None
) -> list[float]:
    hidden = torch.randn(batch, HIDDEN).to(torch.float16)
    steps = [wire.Step(1000 + i, 57, 1) for i in range(batch)]
    async with open_channel(port, tls_dir) as channel:
        stub = stage_pb2_grpc.StageStub(channel)
        times = []
        for i in range(calls + 50):
            started = time.perf_counter()
            message = wire.encode_activations(steps, hidden, sent_unix_ns=time.time_ns())
            await stub.Forward(message, timeout=10)
            if i >= 50:  # warm-up excluded
                times.append(time.perf_counter() - started)
    return times


ROUNDS = 5
"""Per-hop rounds, TLS and plaintext alternating: on a loaded machine the load drifts
between runs by more than TLS costs, so both see the same drift."""


def per_hop(*, calls: int) -> None:
    print(
        f"\n## per-hop overhead: {HIDDEN}-wide fp16 hidden state, loopback gRPC "
        "(serialize + Forward RPC + deserialize + ack)"
    )
    print(
        f"{'links':>9} {'tokens/msg':>10} {'median ms':>10} {'p90 ms':>8} {'bytes/msg':>10} "
        f"{'bytes/token':>12}"
    )
    with tempfile.TemporaryDirectory(prefix="llmpipe-bench-tls-") as pki_dir:
        stage_dir = Path(pki_dir)
        tls.write_local_pki(stage_dir, hosts=["127.0.0.1", "127.0.0.1"])
        sinks = {"mTLS": start_sink(stage_dir / "stage-1"), "plaintext": start_sink(None)}
        try:
            for batch in (1, 4, 16):
                times: dict[str, list[float]] = {links: [] for links in sinks}
                for _ in range(ROUNDS):
                    for links, (port, _) in sinks.items():
                        client = stage_dir / "stage-0" if links == "mTLS" else None
                        times[links] += asyncio.run(
                            time_hops(port, batch=batch, calls=calls // ROUNDS, tls_dir=client)
                        )
                for links in sinks:
                    print_hops(links, batch, times[links])
        finally:
            for _, sink in sinks.values():
                sink.send_signal(signal.SIGTERM)
                sink.wait()
    tokens = stage_pb2.Tokens(
        sequence_ids=[2**40 + i for i in range(16)], token_ids=list(range(31000, 31016))
    )
    print(
        f"return hop (token ids, 16 sequences): {len(tokens.SerializeToString())} bytes, "
        f"{len(tokens.SerializeToString()) / 16:.1f} bytes/token"
    )
    print(f"payload alone: hidden_size x 2 bytes = {HIDDEN * 2} bytes/token")


def start_sink(tls_dir: Path | None) -> tuple[int, subprocess.Popen[str]]:
    """One sink process (a stage 1), with its certificate or plaintext."""
    port = free_port()
    env = dict(
        os.environ,
        PYTHONPATH=f"{ROOT / 'stage_image'}:{ROOT}",
        OMP_NUM_THREADS="1",
    )
    command = [sys.executable, __file__, "--sink", str(port)]
    if tls_dir is not None:
        command += ["--sink-tls", str(tls_dir)]
    sink = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
    return port, sink


def print_hops(links: str, batch: int, times: list[float]) -> None:
    hidden = torch.zeros(batch, HIDDEN, dtype=torch.float16)
    steps = [wire.Step(1000 + i, 57, 1) for i in range(batch)]
    message = wire.encode_activations(steps, hidden, sent_unix_ns=time.time_ns())
    size = len(message.SerializeToString())
    quantiles = statistics.quantiles(times, n=10)
    print(
        f"{links:>9} {batch:>10} {statistics.median(times) * 1e3:>10.3f} "
        f"{quantiles[8] * 1e3:>8.3f} {size:>10} {size / batch:>12.1f}"
    )


# -- 3. throughput ------------------------------------------------------------------------------
def bench_model(path: Path) -> Path:
    from llmpipe_stage import demo

    if not (path / "config.json").is_file():
        demo.write_model(
            path,
            family="llama",
            hidden_size=512,
            intermediate_size=1408,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=1024,
        )
    return path


class Baseline:
    """Single-process `generate` (one torch thread) on the same model, greedy, no early EOS."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(1)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def tokens_per_second(self, *, batch: int, prompt: int, new: int) -> float:
        ids = torch.randint(3, 280, (batch, prompt), generator=torch.Generator().manual_seed(0))
        kwargs = {
            "attention_mask": torch.ones_like(ids),
            "do_sample": False,
            "max_new_tokens": new,
            "min_new_tokens": new,
            "pad_token_id": 0,
        }
        started = time.perf_counter()
        self.model.generate(ids, **kwargs)
        return batch * new / (time.perf_counter() - started)


class Served:
    """`llmpipe serve --model DIR --stages K` in the background."""

    def __init__(self, model_dir: Path, stages: int, run_dir: Path, *, micro_batches: int) -> None:
        self.port = free_block(stages)
        grpc_port = free_block(stages, avoid=range(self.port, self.port + stages))
        env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'operator'}:{ROOT / 'stage_image'}")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llmpipe_cli",
                "serve",
                "--model",
                str(model_dir),
                "--name",
                "bench",
                "--stages",
                str(stages),
                "--port",
                str(self.port),
                "--grpc-port",
                str(grpc_port),
                "--threads",
                "1",
                "--max-sequences",
                "16",
                "--run-dir",
                str(run_dir),
                "--micro-batches",
                str(micro_batches),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
        )
        assert self.process.stdout is not None
        output = []
        for line in self.process.stdout:
            output.append(line)
            if line.startswith("Ctrl-C"):
                return
        raise RuntimeError(f"serve exited with {self.process.wait()}:\n{''.join(output)}")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        self.process.wait(timeout=60)


def pipeline_tokens_per_second(served: Served, *, batch: int, prompt: int, new: int) -> float:
    import urllib.request

    ids = torch.randint(3, 280, (batch, prompt), generator=torch.Generator().manual_seed(0))

    def one(row: list[int]) -> int:
        body = json.dumps(
            {
                "model": "bench",
                "prompt": row,
                "max_tokens": new,
                "temperature": 0,
                "ignore_eos": True,
            }
        ).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{served.port}/v1/completions",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=600) as response:
            return int(json.loads(response.read())["usage"]["completion_tokens"])

    one(ids[0, :4].tolist())  # warm-up
    with ThreadPoolExecutor(batch) as pool:
        started = time.perf_counter()
        produced = sum(pool.map(one, ids.tolist()))
        took = time.perf_counter() - started
    return produced / took


MODELS = {
    "synthetic": "Llama 8 layers, hidden 512, GQA 8/4 (random weights, ~23 M parameters)",
    "smollm2": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized; 30 layers, hidden 576, GQA 9/3)",
}


def model_dir_of(name: str, work: Path) -> Path:
    if name == "synthetic":
        return bench_model(work / "model")
    from llmpipe_stage import gguf_convert, models

    gguf = models.ensure_default_model()
    return gguf_convert.ensure_converted(gguf, models.CACHE_DIR / "gguf")


def throughput(
    model: str,
    stage_counts: list[int],
    batches: list[int],
    *,
    prompt: int,
    new: int,
    repeat: int,
) -> None:
    work = Path(tempfile.mkdtemp(prefix="llmpipe-bench-"))
    model_dir = model_dir_of(model, work)
    print(
        f"\n## decode throughput: {MODELS[model]}, fp32, prompt {prompt} "
        f"tokens, {new} new tokens per sequence; 1 torch thread per process; best of "
        f"{repeat}, pipeline and generate measured alternately"
    )
    baseline = Baseline(model_dir)
    baseline.tokens_per_second(batch=1, prompt=4, new=4)  # warm-up
    print(
        f"{'stages':>6} {'micro-batches':>13} {'in flight':>9} {'pipeline tok/s':>15} "
        f"{'generate tok/s':>15} {'ratio':>6}"
    )
    cores = os.cpu_count() or 1
    for stages in stage_counts:
        # serve's default (min(stages, cores)) and, when different, one per stage.
        for micro in sorted({min(stages, cores), stages}):
            run_dir = work / f"run-{model}-{stages}-{micro}"
            served = Served(model_dir, stages, run_dir, micro_batches=micro)
            try:
                for batch in batches:
                    pipe, base = 0.0, 0.0
                    for _ in range(repeat):
                        pipe = max(
                            pipe,
                            pipeline_tokens_per_second(served, batch=batch, prompt=prompt, new=new),
                        )
                        base = max(
                            base, baseline.tokens_per_second(batch=batch, prompt=prompt, new=new)
                        )
                    print(
                        f"{stages:>6} {micro:>13} {batch:>9} {pipe:>15.1f} {base:>15.1f} "
                        f"{pipe / base:>6.2f}",
                        flush=True,
                    )
            finally:
                served.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sink", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--sink-tls", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--hop-calls", type=int, default=500, help="timed calls per hop size")
    parser.add_argument("--stages", default="1,2,3,4")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-per-hop", action="store_true")
    parser.add_argument(
        "--model", choices=[*MODELS, "both"], default="both", help="throughput on which model"
    )
    args = parser.parse_args()
    if args.sink:
        asyncio.run(run_sink(args.sink, args.sink_tls))
        return 0
    torch.set_num_threads(1)
    print(f"machine: {os.cpu_count()} cores; torch {torch.__version__}")
    if not args.skip_per_hop:
        per_hop(calls=args.hop_calls)
    if not args.skip_throughput:
        for model in MODELS if args.model == "both" else [args.model]:
            throughput(
                model,
                [int(s) for s in args.stages.split(",")],
                [int(b) for b in args.batches.split(",")],
                prompt=args.prompt_tokens,
                new=args.new_tokens,
                repeat=args.repeat,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
