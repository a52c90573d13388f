"""Resume after a stage failure, on real 3-stage pipelines: a middle stage killed (-9)
under 8 open requests and restarted 3 s later costs them a pause (SSE keep-alive comments
while it lasts, the pause counted in /metrics), and every output equals the uninterrupted
run (greedy); a stage that never comes back fails every request with a clear error once
the resume bound has passed (an SSE error event, or 503 in OpenAI's error shape) and
leaves no KV cache on any surviving stage; SIGTERM drains stage 0: its streams finish
exact, a new request gets 503, and it exits 0 as soon as they are done (not at its drain
bound); a lone request whose step dies inside the killed stage resumes long before the
step timeout."""

from __future__ import annotations

import http.client
import json
import re
import signal
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from llmpipe_stage import config as stage_config
from tests.dataplane import pipelines

CONTEXT = 1000
NEW_TOKENS = 120
PROMPTS = [[5 + i, 17, 3 * i + 1, 40] for i in range(8)]


@dataclass
class Stream:
    """One streamed completion, read in its own thread."""

    lines: list[bytes] = field(default_factory=list)
    keep_alives: int = 0
    first_chunk: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def text(self) -> str:
        return "".join(
            json.loads(line.removeprefix(b"data: "))["choices"][0]["text"]
            for line in self.lines
            if line.startswith(b"data: {") and b'"choices"' in line
        )

    @property
    def last(self) -> bytes:
        return self.lines[-1] if self.lines else b""


def body(prompt: list[int]) -> dict[str, object]:
    return {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": NEW_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
    }


def open_stream(pipeline: pipelines.Pipeline, prompt: list[int]) -> Stream:
    stream = Stream()

    def read() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", pipeline.http_ports[0], timeout=120)
        try:
            connection.request(
                "POST",
                "/v1/completions",
                json.dumps({**body(prompt), "stream": True}),
                {"Content-Type": "application/json"},
            )
            response = connection.getresponse()
            while line := response.readline():
                if line.startswith(b":"):
                    stream.keep_alives += 1
                elif line.strip():
                    stream.lines.append(line.strip())
                    stream.first_chunk.set()
        finally:
            connection.close()
            stream.first_chunk.set()
            stream.done.set()

    threading.Thread(target=read, daemon=True).start()
    return stream


def metric(pipeline: pipelines.Pipeline, name: str) -> float:
    with urllib.request.urlopen(f"{pipeline.base_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def uninterrupted(pipeline: pipelines.Pipeline) -> list[str]:
    streams = [open_stream(pipeline, prompt) for prompt in PROMPTS]
    for stream in streams:
        assert stream.done.wait(120)
        assert stream.last == b"data: [DONE]", stream.lines[-3:]
    return [stream.text for stream in streams]


def test_a_middle_stage_killed_and_restarted_costs_8_streams_a_pause_not_their_output(
    model_dirs: dict[str, Path], start_pipeline
) -> None:
    pipeline = start_pipeline(
        model_dirs["llama-gqa"],
        stages=3,
        max_context=CONTEXT,
        extra_args=("--resume-timeout", "60"),
    )
    expected = uninterrupted(pipeline)
    streams = [open_stream(pipeline, prompt) for prompt in PROMPTS]
    for stream in streams:
        assert stream.first_chunk.wait(120)
    pipeline.kill(1)
    time.sleep(3)
    pipeline.spawn(1)
    for stream in streams:
        assert stream.done.wait(180), pipeline.logs()
    assert [s.last for s in streams] == [b"data: [DONE]"] * 8, pipeline.logs()
    assert [s.text for s in streams] == expected
    # The pause was seen by the clients (the stream stayed open) and counted by stage 0.
    assert all(s.keep_alives >= 1 for s in streams), [s.keep_alives for s in streams]
    assert metric(pipeline, "llmpipe_resumed_sequences_total") == 8
    assert metric(pipeline, "llmpipe_pause_seconds_count") == 8
    assert metric(pipeline, "llmpipe_pause_seconds_sum") >= 8 * 3
    assert metric(pipeline, "llmpipe_resume_failed_sequences_total") == 0
    assert pipeline.wait_no_cache() == {0: [], 1: [], 2: []}


def test_a_stage_that_never_comes_back_fails_every_request_clearly_and_leaks_no_cache(
    model_dirs: dict[str, Path], start_pipeline
) -> None:
    bound = 4
    pipeline = start_pipeline(
        model_dirs["llama-gqa"],
        stages=3,
        max_context=CONTEXT,
        extra_args=("--resume-timeout", str(bound)),
    )
    streams = [open_stream(pipeline, prompt) for prompt in PROMPTS[:6]]
    for stream in streams:
        assert stream.first_chunk.wait(120)
    with ThreadPoolExecutor(2) as pool:
        whole = [
            pool.submit(
                pipelines.http_json,
                f"{pipeline.base_url}/v1/completions",
                {**body(prompt), "max_tokens": CONTEXT - 10},
                120,
            )
            for prompt in PROMPTS[6:]
        ]
        time.sleep(0.5)  # both are in the ring
        pipeline.kill(1)
        killed = time.monotonic()
        for stream in streams:
            assert stream.done.wait(120)
        answers = [future.result() for future in whole]
    took = time.monotonic() - killed
    for stream in streams:
        error = json.loads(stream.last.removeprefix(b"data: "))["error"]
        assert error["type"] == "service_unavailable", error
        assert f"no healthy pipeline came back within {bound} s" in error["message"]
    for status, answer in answers:
        assert status == 503, answer
        assert answer["error"]["type"] == "service_unavailable"
        assert f"no healthy pipeline came back within {bound} s" in answer["error"]["message"]
    assert took < bound + 30, f"failed {took:.1f} s after the kill"
    assert metric(pipeline, "llmpipe_resume_failed_sequences_total") == 8
    assert pipeline.wait_no_cache(stages=[0, 2]) == {0: [], 2: []}


def test_sigterm_drains_stage_0_it_finishes_its_streams_and_refuses_new_ones(
    model_dirs: dict[str, Path], start_pipeline
) -> None:
    pipeline = start_pipeline(
        model_dirs["llama-gqa"],
        stages=2,
        max_context=CONTEXT,
        extra_args=("--drain-timeout", "120"),
    )
    expected = uninterrupted(pipeline)[:2]
    streams = [open_stream(pipeline, prompt) for prompt in PROMPTS[:2]]
    for stream in streams:
        assert stream.first_chunk.wait(120)
    pipeline.processes[0].send_signal(signal.SIGTERM)
    status, answer = pipelines.http_json(f"{pipeline.base_url}/v1/completions", body([5, 6]))
    assert status == 503, answer
    assert "draining" in answer["error"]["message"]
    for stream in streams:
        assert stream.done.wait(120)
    finished = time.monotonic()
    assert [s.text for s in streams] == expected
    # It exits as soon as its sequences are done, not at the 120 s drain bound.
    assert pipeline.processes[0].wait(30) == 0
    assert time.monotonic() - finished < 15


def cpu_ticks(pid: int) -> int:
    """User + system clock ticks the process has used (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def kill_while_computing(pipeline: pipelines.Pipeline, index: int, *, within: float) -> None:
    """SIGKILL stage `index` once it is busy computing (it burned >= 50 ms of CPU in
    100 ms): it has taken its step, so no hop to it fails."""
    pid = pipeline.processes[index].pid
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        before = cpu_ticks(pid)
        time.sleep(0.1)
        if cpu_ticks(pid) - before >= 5:
            pipeline.kill(index)
            return
    raise AssertionError(f"stage {index} never got busy within {within} s")


def test_a_lone_request_whose_step_dies_inside_the_killed_stage_resumes_without_the_step_timeout(
    smollm2_dir: Path, start_pipeline
) -> None:
    """One request, its long prompt's prefill inside the middle stage (28 of the real
    model's 30 layers) when that stage is killed: no hop fails and no stage reports it, so
    stage 0 finds the stage gone when the step is late (a refused connection, then a stage
    loading again) and resumes, instead of waiting for the 300 s step timeout."""
    plan = stage_config.even_plan(30, 3)
    for stage, (start, end) in zip(plan["stages"], [(0, 1), (1, 29), (29, 30)], strict=True):
        stage.update(layerStart=start, layerEnd=end)
    pipeline = start_pipeline(
        smollm2_dir,
        stages=3,
        max_context=CONTEXT,
        plan=plan,
        extra_args=("--resume-timeout", "200", "--step-timeout", "300", "--threads", "1"),
    )
    prompt = [(7 * i) % 40000 + 100 for i in range(900)]
    request = {**body(prompt), "max_tokens": 8}
    url = f"{pipeline.base_url}/v1/completions"
    status, alone = pipelines.http_json(url, request, 240)
    assert status == 200, alone
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(pipelines.http_json, url, request, 280)
        kill_while_computing(pipeline, 1, within=60)
        killed = time.monotonic()
        time.sleep(1)
        pipeline.spawn(1)
        status, resumed = answer.result()
    took = time.monotonic() - killed
    assert status == 200, (resumed, pipeline.logs())
    assert resumed["choices"][0]["text"] == alone["choices"][0]["text"]
    assert metric(pipeline, "llmpipe_resumed_sequences_total") == 1
    # Far below the step timeout: the restart (torch import, load) is most of the pause.
    assert took < 200, f"the request finished {took:.0f} s after the kill"
    assert pipeline.wait_no_cache() == {0: [], 1: [], 2: []}
