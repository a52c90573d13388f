"""Test helpers: tiny random models on disk and real stage processes on loopback.

`Pipeline.start(model_dir, stages=N)` writes the same plan.json + pipeline.json the operator
mounts and a fresh CA with one certificate per stage (`run_dir/tls/stage-<i>`, what the
operator's stage Secrets hold), starts `python -m llmpipe_stage` once per stage (torch
threads = 1 each) on free ports with mutual TLS, and waits for stage 0's /readyz.
`channel(i, as_stage=k)` dials stage i with stage k's certificate. Nothing here is mocked.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from llmpipe_stage import config as stage_config
from llmpipe_stage import tls
from llmpipe_stage.proto import stage_pb2, stage_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]

# Families under test: Llama with grouped-query attention, Qwen2 with tied embeddings.
FAMILIES: dict[str, dict[str, Any]] = {
    "llama-gqa": {
        "family": "llama",
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "max_position_embeddings": 1024,
        "initializer_range": 0.3,
    },
    "qwen2-tied": {
        "family": "qwen2",
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "max_position_embeddings": 1024,
        "initializer_range": 0.3,
        "tie_word_embeddings": True,
    },
}


def write_family(path: Path, name: str) -> Path:
    from llmpipe_stage import demo

    spec = dict(FAMILIES[name])
    family = spec.pop("family")
    return demo.write_model(path, family=family, seed=1234, **spec)


def free_ports(count: int) -> list[int]:
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
    ports = [s.getsockname()[1] for s in sockets]
    for sock in sockets:
        sock.close()
    return ports


def free_port_blocks(count: int, length: int) -> list[int]:
    """The first ports of `count` blocks of `length` consecutive ports, each free now.

    `llmpipe serve --port P --grpc-port G` with N stages listens on P..P+N-1 and
    G..G+N-1; two ports the kernel handed out one at a time say nothing about their
    neighbours, which a busy machine's outgoing connections may hold.
    """
    starts: list[int] = []
    held: list[socket.socket] = []
    try:
        while len(starts) < count:
            probe = socket.socket()
            probe.bind(("127.0.0.1", 0))
            start = probe.getsockname()[1]
            block = [probe]
            try:
                for port in range(start + 1, start + length):
                    sock = socket.socket()
                    block.append(sock)
                    sock.bind(("127.0.0.1", port))
            except (OSError, OverflowError):  # a neighbour is held, or past 65535
                for sock in block:
                    sock.close()
                continue
            held.extend(block)
            starts.append(start)
    finally:
        for sock in held:
            sock.close()
    return starts


READY_LINE = "Ctrl-C stops every stage"
"""The last line `llmpipe serve` prints once every stage serves."""


@dataclass
class Served:
    """A running `llmpipe serve`: what it printed up to its ready line, and (after the
    `serving` block) the exit code Ctrl-C gave."""

    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    exit_code: int | None = None

    @property
    def output(self) -> str:
        return "".join(self.lines)


@contextlib.contextmanager
def serving(args: list[str], *, timeout: float, cache: Path | None = None) -> Iterator[Served]:
    """`llmpipe serve ARGS` from the checkout, read up to its ready line (or its exit, or
    `timeout`), then stopped with Ctrl-C (SIGINT) as a user would. `cache` replaces the
    user's cache directory (LLMPIPE_CACHE); None keeps it (the fetched default model)."""
    environment = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'operator'}:{ROOT / 'stage_image'}")
    if cache is not None:
        environment["LLMPIPE_CACHE"] = str(cache)
    command = [sys.executable, "-m", "llmpipe_cli", "serve", *args]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environment, text=True
    )
    assert process.stdout is not None
    served = Served(process)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None:
            served.lines.append(process.stdout.readline())
            if served.lines[-1].startswith(READY_LINE):
                break
        yield served
    finally:
        process.send_signal(signal.SIGINT)
        served.exit_code = process.wait(timeout=30)


def http_json(
    url: str, body: dict[str, Any] | None = None, timeout: float = 60.0
) -> tuple[int, dict[str, Any]]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def complete(
    pipeline: Pipeline, prompt: list[int], max_tokens: int, *, model: str = "tiny"
) -> list[int]:
    """Greedy `/v1/completions` on token ids: the generated token ids."""
    status, body = http_json(
        f"{pipeline.base_url}/v1/completions",
        {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "return_token_ids": True,
        },
    )
    assert status == 200, body
    return list(body["choices"][0]["token_ids"])


def complete_concurrently(
    pipeline: Pipeline, prompts: list[list[int]], lengths: list[int], *, model: str = "tiny"
) -> list[list[int]]:
    """`complete` for every prompt at once (one thread each), in prompt order."""
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(
            pool.map(
                lambda args: complete(pipeline, *args, model=model),
                zip(prompts, lengths, strict=True),
            )
        )


@dataclass
class Pipeline:
    model_dir: Path
    run_dir: Path
    grpc_ports: list[int]
    http_ports: list[int]
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)
    """Address each stage binds and is reached at (default 127.0.0.1)."""
    prefixes: list[list[str]] = field(default_factory=list)
    """Command prefix per stage, e.g. ["ip", "netns", "exec", NS] to run it elsewhere."""
    plaintext: bool = False
    """Stages run with --plaintext (no TLS) instead of their certificates."""
    ca: Any = None
    """The pipeline's CA (`pki.KeyPair`, key included), kept in memory for tests that
    issue certificates of their own."""

    def tls_dir(self, index: int) -> Path:
        return self.run_dir / "tls" / f"stage-{index}"

    @contextlib.contextmanager
    def channel(self, index: int, *, as_stage: int = 0) -> Iterator[grpc.Channel]:
        """A channel to stage `index` presenting stage `as_stage`'s certificate."""
        address = f"{self.host(index)}:{self.grpc_ports[index]}"
        if self.plaintext:
            with grpc.insecure_channel(address) as channel:
                yield channel
            return
        material = tls.TlsFiles(self.tls_dir(as_stage)).material
        with grpc.secure_channel(address, tls.channel_credentials(material)) as channel:
            yield channel

    def host(self, index: int) -> str:
        return self.hosts[index] if self.hosts else "127.0.0.1"

    @property
    def base_url(self) -> str:
        return f"http://{self.host(0)}:{self.http_ports[0]}"

    @property
    def num_stages(self) -> int:
        return len(self.grpc_ports)

    @classmethod
    def start(
        cls,
        model_dir: Path,
        run_dir: Path,
        *,
        stages: int,
        max_sequences: int = 8,
        max_context: int = 128,
        name: str = "tiny",
        extra_args: tuple[str, ...] = (),
        ready_timeout: float = 180.0,
        hosts: list[str] | None = None,
        prefixes: list[list[str]] | None = None,
        plaintext: bool = False,
        plan: Mapping[str, Any] | None = None,
        device: str | None = "cpu",
        dtype: str = "float32",
        workload: Mapping[str, Any] | None = None,
        peer_address: Callable[[str], str] | None = None,
    ) -> Pipeline:
        """`plan` (docs/design.md's plan JSON) splits the layers; default: evenly.
        `device` (cpu / cuda) goes into every stage of plan.json that names none, as the
        operator's plan names it (the CPU by default, like the references); None leaves
        the plan without devices (each stage picks: auto). `workload` adds fields to
        pipeline.json's workload (e.g. prefillChunkTokens); speculation is `off` unless it names
        one (the tests beside it count plain decoding's steps and bytes; the stage's own
        default, `auto`, is what a `None` value leaves: the key unwritten). `peer_address`
        maps each stage's own "host:port" to the address pipeline.json gives its peers (e.g.
        a delaying relay in front of it, tests/support/relay.py)."""
        config = json.loads((model_dir / "config.json").read_text())
        ports = free_ports(2 * stages)
        pipeline = cls(
            model_dir,
            run_dir,
            ports[:stages],
            ports[stages:],
            hosts=hosts or [],
            prefixes=prefixes or [],
            plaintext=plaintext,
        )
        pipeline.ca = tls.write_local_pki(
            run_dir / "tls",
            hosts=[pipeline.host(i) for i in range(stages)],
            pipeline=name,
            plan=run_dir.name.lower().replace("_", "-"),
        )
        config_dir = run_dir / "config"
        config_dir.mkdir(parents=True, exist_ok=True)
        if plan is None:
            plan = stage_config.even_plan(config["num_hidden_layers"], stages)
        if device is not None:
            plan = {
                **plan,
                "stages": [{"device": device, "dtype": dtype, **s} for s in plan["stages"]],
            }
        (config_dir / "plan.json").write_text(json.dumps(plan))
        fields = {"speculation": "off", **(workload or {})}
        (config_dir / "pipeline.json").write_text(
            json.dumps(
                {
                    "model": {"name": name, "dtype": dtype},
                    "workload": {
                        "maxSequences": max_sequences,
                        "maxContextTokens": max_context,
                        **{key: value for key, value in fields.items() if value is not None},
                    },
                    "stages": [
                        {"index": i, "address": (peer_address or str)(f"{pipeline.host(i)}:{p}")}
                        for i, p in enumerate(pipeline.grpc_ports)
                    ],
                }
            )
        )
        for index in range(stages):
            pipeline.spawn(index, extra_args=extra_args)
        pipeline.wait_ready(ready_timeout)
        return pipeline

    def spawn(self, index: int, *, extra_args: tuple[str, ...] = ()) -> None:
        env = dict(
            os.environ,
            PYTHONPATH=f"{ROOT / 'stage_image'}:{ROOT}",
            OMP_NUM_THREADS="1",
        )
        log = (self.run_dir / f"stage-{index}.log").open("ab")
        command = [
            *(self.prefixes[index] if self.prefixes else []),
            sys.executable,
            "-m",
            "llmpipe_stage",
            "--config-dir",
            str(self.run_dir / "config"),
            "--stage-index",
            str(index),
            "--model-dir",
            str(self.model_dir),
            "--host",
            self.host(index),
            "--grpc-port",
            str(self.grpc_ports[index]),
            "--http-port",
            str(self.http_ports[index]),
            "--threads",
            "1",
            *(["--plaintext"] if self.plaintext else ["--tls-dir", str(self.tls_dir(index))]),
            *extra_args,
        ]
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        if index < len(self.processes):
            self.processes[index] = process
        else:
            self.processes.append(process)

    def logs(self) -> str:
        return "\n".join(
            f"--- stage {i} ---\n"
            + (self.run_dir / f"stage-{i}.log").read_text(errors="replace")[-3000:]
            for i in range(self.num_stages)
        )

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for index, process in enumerate(self.processes):
                if process.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"stage {index} exited early\n{self.logs()}")
            try:
                status, _ = http_json(f"{self.base_url}/readyz", timeout=5)
            except (urllib.error.URLError, OSError):
                status = 0
            if status == 200:
                return
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"pipeline not ready after {timeout} s\n{self.logs()}")

    def info(self, index: int, *, as_stage: int = 0) -> stage_pb2.StageInfo:
        with self.channel(index, as_stage=as_stage) as channel:
            return stage_pb2_grpc.StageStub(channel).Info(stage_pb2.InfoRequest(), timeout=5)

    def cached_sequences(self, *, stages: list[int] | None = None) -> dict[int, list[int]]:
        indices = range(self.num_stages) if stages is None else stages
        return {i: list(self.info(i).cached_sequence_ids) for i in indices}

    def wait_no_cache(
        self,
        *,
        stages: list[int] | None = None,
        timeout: float = 15.0,
    ) -> dict[int, list[int]]:
        deadline = time.monotonic() + timeout
        cached = self.cached_sequences(stages=stages)
        while any(cached.values()) and time.monotonic() < deadline:
            time.sleep(0.2)
            cached = self.cached_sequences(stages=stages)
        return cached

    def kill(self, index: int) -> None:
        self.processes[index].send_signal(signal.SIGKILL)
        self.processes[index].wait()

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def reference_tokens(
    model_dir: Path, prompts: list[list[int]], max_new: list[int], *, device: str = "cpu"
) -> list[list[int]]:
    """Single-process greedy `generate`, one prompt at a time (the ground truth), float32
    on `device`."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = model.to(device).eval()
    out = []
    for prompt, n in zip(prompts, max_new, strict=True):
        ids = model.generate(
            torch.tensor([prompt], device=device),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=device),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=model.config.pad_token_id,
        )
        out.append(ids[0, len(prompt) :].tolist())
    return out
