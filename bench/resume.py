"""The pause a stage failure costs a stream: kill -9 of the middle stage of a real 3-stage
pipeline (the tiny llama-gqa test model, CPU, one torch thread per stage, mutual TLS),
restarted after --down seconds, with 1 and 8 streams open.

    PYTHONPATH=operator:stage_image:. python bench/resume.py [--down 0] [--rounds 2]
        [--streams 1 8]

Per round it prints, for each stream, the time from the kill to its first token after the
resume (client side, as the SSE chunks arrive), and stage 0's own figure
(`llmpipe_pause_seconds`: the failure it saw to the first token back, per sequence); the
restarted stage's start (spawn -> its /readyz) is printed beside them, since it is most
of the pause. Figures are printed, never asserted; docs/benchmarks.md records a run.
"""

from __future__ import annotations

import sys

# bench/ also holds operator.py, which would shadow the stdlib `operator` module.
if sys.path and sys.path[0].rstrip("/").endswith("bench"):
    del sys.path[0]

import argparse
import http.client
import json
import re
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from tests.dataplane import pipelines


def stream(pipeline: pipelines.Pipeline, prompt: list[int], chunks: list[float]) -> None:
    """Read one streamed completion, noting the arrival time of every data chunk."""
    connection = http.client.HTTPConnection("127.0.0.1", pipeline.http_ports[0], timeout=300)
    body = {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": 400,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    connection.request("POST", "/v1/completions", json.dumps(body), {})
    response = connection.getresponse()
    while line := response.readline():
        if line.startswith(b"data: {"):
            chunks.append(time.monotonic())
    connection.close()


def pause_metric(pipeline: pipelines.Pipeline) -> tuple[float, float]:
    with urllib.request.urlopen(f"{pipeline.base_url}/metrics", timeout=10) as response:
        text = response.read().decode()

    def value(name: str) -> float:
        found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    return value("llmpipe_pause_seconds_sum"), value("llmpipe_pause_seconds_count")


def stage_ready(pipeline: pipelines.Pipeline, index: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pipeline.info(index).ready:
                return
        except Exception:  # noqa: BLE001 (not up yet)
            pass
        time.sleep(0.05)
    raise RuntimeError(f"stage {index} not ready\n{pipeline.logs()}")


def one_round(pipeline: pipelines.Pipeline, *, streams: int, down_s: float) -> dict[str, float]:
    chunks: list[list[float]] = [[] for _ in range(streams)]
    threads = [
        threading.Thread(target=stream, args=(pipeline, [5 + i, 17, 40], chunks[i]), daemon=True)
        for i in range(streams)
    ]
    for thread in threads:
        thread.start()
    while not all(len(c) >= 5 for c in chunks):
        time.sleep(0.01)
    before_sum, before_count = pause_metric(pipeline)
    pipeline.kill(1)
    killed = time.monotonic()
    time.sleep(down_s)
    spawned = time.monotonic()
    pipeline.spawn(1)
    stage_ready(pipeline, 1)
    restart = time.monotonic() - spawned
    for thread in threads:
        thread.join(300)
    pauses = [min(t for t in c if t > killed) - killed for c in chunks]
    after_sum, after_count = pause_metric(pipeline)
    return {
        "client_pause_median_s": statistics.median(pauses),
        "client_pause_max_s": max(pauses),
        "stage0_pause_mean_s": (after_sum - before_sum) / max(1.0, after_count - before_count),
        "resumed": after_count - before_count,
        "stage_restart_s": restart,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--down", type=float, default=0.0, help="seconds the stage stays dead")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = pipelines.write_family(root / "model", "llama-gqa")
        pipeline = pipelines.Pipeline.start(
            model, root / "run", stages=3, max_context=1000, extra_args=("--resume-timeout", "600")
        )
        try:
            for streams in args.streams:
                for n in range(args.rounds):
                    figures = one_round(pipeline, streams=streams, down_s=args.down)
                    shown = "  ".join(f"{k}={v:.2f}" for k, v in figures.items())
                    print(f"streams={streams} down={args.down:g}s round={n + 1}  {shown}")
        finally:
            pipeline.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
