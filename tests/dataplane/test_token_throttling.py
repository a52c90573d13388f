"""Token throttling: a long prompt arriving while a stream decodes neither starves the
stream nor is starved, and its output stays exact.

Two real stage processes of a random-weight Llama (hidden 256, 8 layers: compute, not
per-message overhead, sets a chunk's cost) split unevenly (stage 0 runs 1 layer, stage 1
the other 7), so stage 0 cuts chunks far faster than stage 1 runs them: without a bound
the chunks pile up in front of stage 1 and the stream's decode step queues behind them.
The same scenario runs with the bound off (`prefillTokensInFlight` 0) and at its default
(two chunks per stage). What is compared is not time but counts, so a loaded machine
slows both alike: the stream's tokens that arrive while the long prompt prefills, per
chunk of that prompt. With the bound, at most `limit / chunk` chunks are ahead of a decode
step anywhere in the ring, so the stream gets at least one token per `limit / chunk + 1`
chunks (the test asks for half of that)."""

from __future__ import annotations

import http.client
import json
import math
import re
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from llmpipe_stage import config as stage_config
from tests.dataplane import pipelines

CHUNK = 16
LONG_TOKENS = 1024
STREAM_PROMPT = [11, 42, 7, 30]
CONTEXT = LONG_TOKENS + 8
LAYERS = 8


@dataclass
class Stream:
    """One streamed completion read in its own thread: each chunk's arrival time."""

    arrivals: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    def during(self, start: float, end: float) -> int:
        return sum(1 for t in self.arrivals if start <= t <= end)


def open_stream(pipeline: pipelines.Pipeline, prompt: list[int], max_tokens: int) -> Stream:
    stream = Stream()
    body = {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }

    def read() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", pipeline.http_ports[0], timeout=120)
        try:
            connection.request(
                "POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"}
            )
            response = connection.getresponse()
            while not stream.stop.is_set() and (line := response.readline()):
                if line.startswith(b"data: {") and b'"choices"' in line:
                    stream.arrivals.append(time.monotonic())
                    choice = json.loads(line.removeprefix(b"data: "))["choices"][0]
                    stream.texts.append(choice["text"])
        finally:
            connection.close()  # leaving early cancels the request
            stream.done.set()

    threading.Thread(target=read, daemon=True).start()
    return stream


def throttled_count(pipeline: pipelines.Pipeline) -> float:
    with urllib.request.urlopen(f"{pipeline.base_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.search(r"^llmpipe_prefill_throttled_total (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def uneven_plan() -> dict[str, object]:
    plan = stage_config.even_plan(LAYERS, 2)
    stages = plan["stages"]
    stages[0] = {**stages[0], "layerEnd": 1}
    stages[1] = {**stages[1], "layerStart": 1}
    return plan


@dataclass
class Run:
    long_output: list[int]
    stream_tokens_during: int
    chunks: int
    max_gap_s: float
    prefill_s: float
    stream_text: str


def long_prompt_while_streaming(pipeline: pipelines.Pipeline, long: list[int]) -> Run:
    """Start a stream, let it decode, send the long prompt, count the stream's tokens
    until the long prompt's answer is back, then cancel the stream."""
    stream = open_stream(pipeline, STREAM_PROMPT, CONTEXT - len(STREAM_PROMPT) - 2)
    deadline = time.monotonic() + 60
    while len(stream.arrivals) < 8:  # decoding steadily
        assert time.monotonic() < deadline and not stream.done.is_set(), "stream did not start"
        time.sleep(0.01)
    started = time.monotonic()
    output = pipelines.complete(pipeline, long, 2)
    ended = time.monotonic()
    still_streaming = not stream.done.is_set()
    stream.stop.set()
    assert stream.done.wait(60)
    assert still_streaming, "the stream ended before the long prompt was answered"
    inside = [t for t in stream.arrivals if started <= t <= ended]
    gaps = [b - a for a, b in zip([started, *inside], [*inside, ended], strict=True)]
    return Run(
        long_output=output,
        stream_tokens_during=len(inside),
        chunks=math.ceil(len(long) / CHUNK),
        max_gap_s=max(gaps),
        prefill_s=ended - started,
        stream_text="".join(stream.texts),
    )


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llmpipe_stage import demo

    return demo.write_model(
        tmp_path_factory.mktemp("throttling") / "model",
        family="llama",
        seed=7,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )


def test_a_long_prompt_neither_starves_a_decoding_stream_nor_is_starved(
    model: Path, start_pipeline
) -> None:
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    long = [(7 * i) % (vocab - 10) + 5 for i in range(LONG_TOKENS)]
    long_reference = pipelines.reference_tokens(model, [long], [2])[0]
    runs: dict[str, Run] = {}
    for mode, workload in {
        "unbounded": {"prefillChunkTokens": CHUNK, "prefillTokensInFlight": 0},
        "throttled": {"prefillChunkTokens": CHUNK},  # the default bound
    }.items():
        pipeline = start_pipeline(
            model, stages=2, max_context=CONTEXT, plan=uneven_plan(), workload=workload
        )
        try:
            assert pipelines.complete(pipeline, STREAM_PROMPT, 4)  # warm up
            runs[mode] = long_prompt_while_streaming(pipeline, long)
            engaged = throttled_count(pipeline)
        finally:
            pipeline.stop()
        assert (engaged > 0) == (mode == "throttled"), (mode, engaged)
    off, on = runs["unbounded"], runs["throttled"]
    print(
        f"\nstream tokens during a {len(long)}-token prefill in {on.chunks} chunks of {CHUNK}:"
        f" unbounded {off.stream_tokens_during} (longest gap {off.max_gap_s:.2f} s of"
        f" {off.prefill_s:.2f} s), throttled {on.stream_tokens_during} (longest gap"
        f" {on.max_gap_s:.2f} s of {on.prefill_s:.2f} s)"
    )
    # the long prompt is not starved and its output is exact either way
    assert off.long_output == on.long_output == long_reference
    # the stream's output is the same whatever the interleaving
    shorter = min(len(off.stream_text), len(on.stream_text))
    assert off.stream_text[:shorter] == on.stream_text[:shorter]
    # the stream is not starved: at most limit / chunk = 4 chunks ahead of each decode
    # step, so one token per 5 chunks at worst; ask for half of it, and for clearly more
    # than the unbounded run, per chunk of the long prompt
    ahead = 2 * 2  # two chunks per stage
    assert on.stream_tokens_during >= on.chunks / (2 * (ahead + 1)), on
    assert on.stream_tokens_during >= 2 * off.stream_tokens_during + 1, (off, on)
