"""`llmpipe serve`, the README's main command, end to end: with `--model demo` it generates
the demo model, starts one process per stage on loopback, reports progress and a curl
example, streams tokens through the OpenAI API, and Ctrl-C stops every stage; with no model
it serves SmolLM2-135M-Instruct (the GGUF file from the cache, converted once) as a 2-stage
pipeline that answers a sanity question sensibly. The stage links are mutual TLS with
certificates generated at start in a private dir (plaintext gRPC calls are refused), and
that dir is gone after exit. A stage killed with -9 is restarted by serve (which keeps
running) and the stream open through it completes with the uninterrupted run's text."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path

import grpc
import openai

from llmpipe_stage.proto import stage_pb2, stage_pb2_grpc
from tests.dataplane import pipelines


def test_serve_demo_model_streams_tokens_and_stops_cleanly(tmp_path: Path) -> None:
    http_port, grpc_port = pipelines.free_port_blocks(2, 4)
    args = ["--model", "demo", "--stages", "3", "--port", str(http_port)]
    args += ["--grpc-port", str(grpc_port), "--threads", "1", "--run-dir", str(tmp_path / "run")]
    with pipelines.serving(args, timeout=180, cache=tmp_path / "cache") as served:
        output, lines = served.output, served.lines
        assert "generating the demo model" in output, output
        assert "stage 2: layers [6, 8)" in output and "ready" in output, output
        assert f"curl -N http://127.0.0.1:{http_port}/v1/chat/completions" in output, output
        (tls_line,) = [line for line in lines if "stage links mutual TLS" in line]
        tls_dir = Path(tls_line.split("certificates in ")[1].split(" (")[0])
        assert tls_dir.stat().st_mode & 0o777 == 0o700
        assert sorted(p.name for p in (tls_dir / "stage-1").iterdir()) == [
            "ca.crt",
            "tls.crt",
            "tls.key",
        ]
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port + 1}") as channel:
            try:
                stage_pb2_grpc.StageStub(channel).Info(stage_pb2.InfoRequest(), timeout=5)
                refused = None
            except grpc.RpcError as error:
                refused = error.code()
        assert refused == grpc.StatusCode.UNAVAILABLE

        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{http_port}/v1", api_key="none", max_retries=0
        )
        stream = client.chat.completions.create(
            model="llmpipe-demo",
            stream=True,
            max_tokens=12,
            temperature=0.8,
            seed=1,
            messages=[{"role": "user", "content": "hello, tell me a story"}],
        )
        pieces = [c.choices[0].delta.content for c in stream if c.choices]
        assert len([p for p in pieces if p]) >= 2, pieces
    assert served.exit_code == 0
    assert not tls_dir.exists()
    for port in (http_port, http_port + 1, http_port + 2, grpc_port, grpc_port + 2):
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still served"


SANITY = [
    ("What is the capital of France?", "Paris"),
    ("Which city is the capital of France? Answer with the city's name.", "Paris"),
]


def test_serve_default_model_answers_sanity_prompts(tmp_path: Path, smollm2_dir: Path) -> None:
    """The README quickstart: `make serve` with no model (smoke: the answers' words, not an
    exactness check; the exact checks are in test_real_model)."""
    http_port, grpc_port = pipelines.free_port_blocks(2, 4)
    args = ["--port", str(http_port), "--grpc-port", str(grpc_port), "--threads", "1"]
    with pipelines.serving([*args, "--run-dir", str(tmp_path)], timeout=300) as served:
        output = served.output
        assert "2-stage pipeline of SmolLM2-135M-Instruct ready" in output, output
        assert "stage 1: layers [15, 30)" in output, output
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{http_port}/v1", api_key="none", max_retries=0
        )
        for question, word in SANITY:
            reply = client.chat.completions.create(
                model="SmolLM2-135M-Instruct",
                max_tokens=24,
                temperature=0,
                messages=[{"role": "user", "content": question}],
            )
            assert word in (reply.choices[0].message.content or ""), (question, reply)
    assert served.exit_code == 0


def streamed_text(port: int, *, on_first_chunk: Callable[[], None] = lambda: None) -> str:
    """One greedy streamed completion's text; `on_first_chunk` runs when its first arrives."""
    body = {
        "model": "llmpipe-demo",
        "prompt": "once upon a time",
        "max_tokens": 200,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    connection.request("POST", "/v1/completions", json.dumps(body), {})
    response = connection.getresponse()
    pieces: list[str] = []
    last = b""
    while line := response.readline():
        if line.startswith(b"data: {"):
            if not pieces:
                on_first_chunk()
            pieces.append(json.loads(line.removeprefix(b"data: "))["choices"][0]["text"])
        if line.startswith(b"data: "):
            last = line.strip()
    connection.close()
    assert last == b"data: [DONE]", (last, pieces[-3:])
    return "".join(pieces)


def test_serve_restarts_a_killed_stage_and_its_stream_resumes(tmp_path: Path) -> None:
    http_port, grpc_port = pipelines.free_port_blocks(2, 4)
    run_dir = tmp_path / "run"
    args = ["--model", "demo", "--stages", "3", "--port", str(http_port)]
    args += ["--grpc-port", str(grpc_port), "--threads", "1", "--run-dir", str(run_dir)]
    with pipelines.serving(args, timeout=180, cache=tmp_path / "cache") as served:
        assert served.process.poll() is None, served.output
        expected = streamed_text(http_port)
        first_pid = int((run_dir / "stage-1.pid").read_text())

        def kill_stage_1() -> None:
            os.kill(first_pid, signal.SIGKILL)

        assert streamed_text(http_port, on_first_chunk=kill_stage_1) == expected
        assert int((run_dir / "stage-1.pid").read_text()) != first_pid
        assert served.process.poll() is None  # serve kept running
    assert served.exit_code == 0
    assert served.process.stdout is not None
    rest = served.process.stdout.read()
    assert "stage 1 exited with code -9; restarting it in 1 s" in rest, rest
    assert "stage 1 restarted" in rest, rest
