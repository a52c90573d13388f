"""Stage 0's HTTP API under hostile input, against a real 2-stage pipeline listening on the
wildcard address: malformed bodies of every kind get 400 (or 404/413) in OpenAI's error
shape and never a 500 or a dropped connection (hypothesis over JSON-ish bodies and raw
bytes); booleans are booleans; a huge prompt is refused or tokenized off the event loop
without stalling a concurrent stream; a tiny temperature is greedy; the KV cache gauges
return to 0; the listener answers on IPv4 and, where the machine has it, IPv6 (`::1`), and
on IPv4 where IPv6 is switched off; /readyz answers within the probe's timeout when a stage
is stuck."""

from __future__ import annotations

import http.client
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.dataplane import pipelines

CONTEXT = 1000
PROMPT_CHARS = 1_000_000  # the default --max-prompt-chars


@pytest.fixture(scope="module")
def pipeline(model_dirs: dict[str, Path], start_pipeline) -> Iterator[pipelines.Pipeline]:
    # Every stage binds the wildcard (the last --host wins); peers dial 127.0.0.1.
    yield start_pipeline(
        model_dirs["llama-gqa"], stages=2, max_context=CONTEXT, extra_args=("--host", "0.0.0.0")
    )


@pytest.fixture(scope="module")
def client(pipeline: pipelines.Pipeline) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{pipeline.http_ports[0]}/v1", api_key="x", max_retries=0
    )


def post(
    pipeline: pipelines.Pipeline, path: str, data: bytes, *, host: str = "127.0.0.1"
) -> tuple[int, bytes]:
    """One request on a fresh connection; a dropped connection raises (fails the test)."""
    connection = http.client.HTTPConnection(host, pipeline.http_ports[0], timeout=120)
    try:
        connection.request("POST", path, data, {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def assert_client_error(status: int, body: bytes, *, says: str = "") -> dict[str, Any]:
    assert 400 <= status < 500, (status, body[:300])
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["message"], error
    assert says in error["message"], error
    return dict(error)


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nests deeper than"),
        (b'{"prompt": "\xc3\x28 invalid"}', "not valid UTF-8"),
        (b'{"prompt": "hi", "stream": true, "stream_options": "yes"}', "stream_options must be"),
        (b'{"prompt": "hi", "stream": "false"}', "stream must be true or false"),
        (b'{"prompt": "hi", "temperature": NaN}', "NaN is not valid JSON"),
        (b'{"prompt": "hi\\udc00"}', "unpaired UTF-16 surrogate"),
        (b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", "not valid JSON"),
        (b'{"prompt": "hi", "seed": 18446744073709551616}', "seed must be an integer in"),
    ],
)
def test_the_reported_bodies_are_400_in_the_openai_shape(
    pipeline: pipelines.Pipeline, data: bytes, says: str
) -> None:
    status, body = post(pipeline, "/v1/completions", data)
    assert status == 400
    assert_client_error(status, body, says=says)


def test_a_stream_false_string_does_not_stream(pipeline: pipelines.Pipeline) -> None:
    status, body = post(pipeline, "/v1/completions", b'{"prompt": "hi", "stream": "false"}')
    assert status == 400 and not body.startswith(b"data:")


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = [
    *("model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature"),
    *("top_p", "seed", "n", "stop", "stream", "stream_options", "ignore_eos", "return_token_ids"),
]
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "robot"]), "content": json_values}
    ),
    max_size=3,
)
fields = st.sampled_from(FIELDS) | st.text(max_size=6)
bodies = st.dictionaries(fields, json_values, max_size=6) | st.fixed_dictionaries(
    {"messages": messages, "prompt": st.text(max_size=30) | st.lists(st.integers(-5, 300))},
    optional={
        "max_tokens": st.integers(-2, 12) | json_values,
        "temperature": st.floats(0, 2) | json_values,
        "stream": st.booleans() | json_values,
        "stream_options": st.fixed_dictionaries({"include_usage": json_values}) | json_values,
        "stop": st.text(max_size=3) | json_values,
        "model": st.sampled_from(["tiny", "other"]) | json_values,
        "seed": st.integers(-(2**64), 2**64),
    },
)
endpoints = st.sampled_from(["/v1/completions", "/v1/chat/completions"])


def check_answer(status: int, body: bytes) -> None:
    assert status < 500, (status, body[:300])
    if status == 200:
        assert body.startswith(b"data: ") or "choices" in json.loads(body)
    else:
        assert_client_error(status, body)


fuzz = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@fuzz
@given(body=bodies, path=endpoints)
def test_fuzzed_json_bodies_never_500(
    pipeline: pipelines.Pipeline, body: dict[str, Any], path: str
) -> None:
    if isinstance(body.get("max_tokens"), int):
        body["max_tokens"] = min(body["max_tokens"], 12)  # keep the valid ones short
    body.setdefault("max_tokens", 8)
    check_answer(*post(pipeline, path, json.dumps(body).encode()))


@fuzz
@given(data=st.binary(max_size=300) | st.text(max_size=100).map(str.encode), path=endpoints)
def test_fuzzed_bytes_never_500(pipeline: pipelines.Pipeline, data: bytes, path: str) -> None:
    check_answer(*post(pipeline, path, data))


# -- a huge prompt and a concurrent stream ----------------------------------------------------
def stream_arrivals(pipeline: pipelines.Pipeline, arrivals: list[float]) -> None:
    """A long greedy stream; appends the arrival time of every event."""
    body = {"prompt": [5, 6, 7], "max_tokens": CONTEXT - 10, "ignore_eos": True, "stream": True}
    connection = http.client.HTTPConnection("127.0.0.1", pipeline.http_ports[0], timeout=120)
    connection.request("POST", "/v1/completions", json.dumps(body), {})
    response = connection.getresponse()
    assert response.status == 200
    while line := response.readline():
        if line.startswith(b"data: "):
            arrivals.append(time.perf_counter())
    connection.close()


HUGE = [
    # (what, prompt characters, expected status, words in the error)
    ("over --max-prompt-chars: refused before tokenizing", PROMPT_CHARS + 1, 400, "characters"),
    ("400k characters: tokenized off the loop, then over the context", 400_000, 400, "tokens"),
    ("20 MB: over the body limit", 20_000_000, 413, "larger than"),
]


def worst_gap(arrivals: list[float], start: float, end: float) -> float:
    """The longest time between two stream events around [start, end] (the events just
    before and after included, so a stall that swallows every event still counts)."""
    inside = [t for t in arrivals if start <= t <= end]
    after = [t for t in arrivals if t > end][:1]
    before = [t for t in arrivals if t < start][-1:]
    return max(b - a for a, b in itertools.pairwise(before + inside + after))


def huge_requests_beside_a_stream(pipeline: pipelines.Pipeline) -> list[tuple[str, float, float]]:
    """One attempt: the HUGE requests one after another while a stream runs. Returns
    (what, request seconds, worst gap) per request, plus ("outside", 0, 99th percentile)
    of the stream's gaps away from every request: this machine's own noise."""
    arrivals: list[float] = []
    streamer = threading.Thread(target=stream_arrivals, args=(pipeline, arrivals))
    streamer.start()
    while len(arrivals) < 50 and streamer.is_alive():
        time.sleep(0.01)
    windows = []
    for what, chars, status, says in HUGE:
        prompt = ("the river and the stone " * (chars // 24 + 1))[:chars]
        data = json.dumps({"prompt": prompt, "max_tokens": 4}).encode()
        started = time.perf_counter()
        answer = post(pipeline, "/v1/completions", data)
        windows.append((what, started, time.perf_counter()))
        assert answer[0] == status, (what, answer[1][:300])
        assert_client_error(*answer, says=says)
    streamer.join(timeout=120)
    assert arrivals[-1] > windows[-1][2], "the stream ended before the requests did"
    busy = [(start - 0.5, end + 0.5) for _, start, end in windows]
    outside = [
        b - a
        for a, b in itertools.pairwise(arrivals)
        if not any(low <= b and a <= high for low, high in busy)
    ]
    return [
        *((what, end - start, worst_gap(arrivals, start, end)) for what, start, end in windows),
        # The 99th percentile: one rare starvation spike elsewhere must not loosen the bound.
        ("outside", 0.0, sorted(outside)[int(0.99 * (len(outside) - 1))]),
    ]


def test_a_huge_prompt_does_not_stall_a_concurrent_stream(pipeline: pipelines.Pipeline) -> None:
    """The issue's bound: no stall over 100 ms beyond the gaps the same stream shows away
    from the huge requests (their 99th percentile). A loaded shared machine can starve
    any process for that long now and then, so up to three attempts are made; a stall
    caused by the requests (the tokenizer on the event loop took 1-17 s for such prompts)
    fails every one."""
    for attempt in range(1, 4):
        figures = huge_requests_beside_a_stream(pipeline)
        noise = figures[-1][2]
        print(f"\nattempt {attempt}: p99 stream gap away from the requests {noise * 1000:.1f} ms")
        for what, took, gap in figures[:-1]:
            print(f"  {what}: request {took * 1000:.0f} ms, worst stream gap {gap * 1000:.1f} ms")
        if all(gap < 0.1 + noise for _, _, gap in figures[:-1]):
            return
    pytest.fail(f"a huge request stalled the stream by over 100 ms in 3 attempts: {figures}")


# -- sampling, metrics, listener --------------------------------------------------------------
def test_a_tiny_temperature_is_greedy(client: openai.OpenAI) -> None:
    prompt = "the river and the stone"
    greedy = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
    for temperature, top_p in ((1e-45, 1.0), (1e-30, 1.0), (1e-45, 1e-45), (1.0, 0.0)):
        tiny = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=24, temperature=temperature, top_p=top_p
        )
        assert tiny.choices[0].text == greedy.choices[0].text, (temperature, top_p)


def gauges(pipeline: pipelines.Pipeline, index: int) -> dict[str, float]:
    url = f"http://127.0.0.1:{pipeline.http_ports[index]}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    found = re.findall(r"^(llmpipe_kv_cache_\w+)\{[^}]*\} (\S+)$", text, flags=re.M)
    return {name: float(value) for name, value in found}


def test_kv_cache_gauges_fall_to_zero_after_a_run(pipeline: pipelines.Pipeline) -> None:
    body = {"prompt": [5, 6, 7], "max_tokens": 400, "ignore_eos": True, "stream": True}
    connection = http.client.HTTPConnection("127.0.0.1", pipeline.http_ports[0], timeout=60)
    connection.request("POST", "/v1/completions", json.dumps(body), {})
    response = connection.getresponse()
    for _ in range(20):
        response.readline()
    during = [gauges(pipeline, i) for i in range(pipeline.num_stages)]
    response.read()
    connection.close()
    assert pipeline.wait_no_cache() == {0: [], 1: []}
    deadline = time.monotonic() + 10
    after = [gauges(pipeline, i) for i in range(pipeline.num_stages)]
    while any(g["llmpipe_kv_cache_bytes"] for g in after) and time.monotonic() < deadline:
        time.sleep(0.2)
        after = [gauges(pipeline, i) for i in range(pipeline.num_stages)]
    print(f"\nduring: {during}\nafter: {after}")
    assert all(g["llmpipe_kv_cache_bytes"] > 0 for g in during), during
    assert all(g["llmpipe_kv_cache_sequences"] == 1 for g in during), during
    assert after == [{"llmpipe_kv_cache_sequences": 0.0, "llmpipe_kv_cache_bytes": 0.0}] * 2


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_the_listener_serves_ipv4_and_ipv6(pipeline: pipelines.Pipeline) -> None:
    hosts = ["127.0.0.1"] + (["::1"] if has_ipv6_loopback() else [])
    for host in hosts:
        status, body = post(
            pipeline, "/v1/completions", b'{"prompt": [5, 6], "max_tokens": 2}', host=host
        )
        assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 2, host
        connection = http.client.HTTPConnection(host, pipeline.http_ports[0], timeout=10)
        connection.request("GET", "/readyz")
        assert connection.getresponse().status == 200, host
        connection.close()
    if len(hosts) == 1:
        pytest.skip("no IPv6 loopback here: IPv4 checked, IPv6 not")


def test_readyz_answers_within_the_probe_timeout_when_a_stage_is_stuck(
    pipeline: pipelines.Pipeline,
) -> None:
    time.sleep(1.2)  # an idle ring: /readyz asks the other stages
    pipeline.processes[1].send_signal(signal.SIGSTOP)
    try:
        # The kubelet gives the probe 3 s (manifests/stages.py); an answer later than that
        # is a failed probe whatever it says.
        status, body = pipelines.http_json(
            f"http://127.0.0.1:{pipeline.http_ports[0]}/readyz", timeout=3
        )
    finally:
        pipeline.processes[1].send_signal(signal.SIGCONT)
    assert status == 503 and "stage 1" in body["reason"] and "unreachable" in body["reason"]
    pipeline.wait_ready(30)


PROBE = """
import socket, sys
from llmpipe_stage import gateway
server = gateway.dual_stack_socket(0)
server.listen()
client = socket.create_connection(("127.0.0.1", server.getsockname()[1]), timeout=5)
conn, peer = server.accept()
client.sendall(b"ping")
print(conn.recv(4).decode(), server.family.name)
"""


def test_the_listener_serves_ipv4_where_ipv6_is_disabled(tmp_path: Path) -> None:
    """In a network namespace of its own with IPv6 switched off (the kernel's sysctl), the
    wildcard listener still binds and takes IPv4 connections."""
    if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("ip")):
        pytest.skip("needs root, unshare and ip for a network namespace")
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    off = " ".join(f"net.ipv6.conf.{name}.disable_ipv6=1" for name in ("all", "default", "lo"))
    script = f"ip link set lo up && sysctl -qw {off} && {sys.executable} {probe}"
    result = subprocess.run(
        ["unshare", "-n", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **os.environ,
            "PYTHONPATH": f"{pipelines.ROOT / 'stage_image'}:{pipelines.ROOT / 'operator'}",
        },
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "ping", result.stdout
