"""`llmpipe serve`, the README's main command, end to end: with no model it generates the
demo model, starts one process per stage on loopback, reports progress and a curl example,
streams tokens through the OpenAI API, and Ctrl-C stops every stage."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai

from tests.dataplane import pipelines


def test_serve_with_no_model_streams_tokens_and_stops_cleanly(tmp_path: Path) -> None:
    http_port, grpc_port = pipelines.free_ports(2)
    env = dict(
        os.environ,
        LLMPIPE_CACHE=str(tmp_path / "cache"),
        PYTHONPATH=f"{pipelines.ROOT / 'operator'}:{pipelines.ROOT / 'stage_image'}",
    )
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llmpipe_operator.cli",
            "serve",
            "--stages",
            "3",
            "--port",
            str(http_port),
            "--grpc-port",
            str(grpc_port),
            "--threads",
            "1",
            "--run-dir",
            str(tmp_path / "run"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )
    assert process.stdout is not None
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and process.poll() is None:
            line = process.stdout.readline()
            lines.append(line)
            if line.startswith("Ctrl-C stops every stage"):
                break
        output = "".join(lines)
        assert "generating the demo model" in output, output
        assert "stage 2: layers [6, 8)" in output and "ready" in output, output
        assert f"curl -N http://127.0.0.1:{http_port}/v1/chat/completions" in output, output

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
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=30)
    assert code == 0
    for port in (http_port, http_port + 1, http_port + 2, grpc_port, grpc_port + 2):
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still served"
