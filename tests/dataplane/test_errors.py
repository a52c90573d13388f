"""Failure handling of a real 3-stage pipeline: malformed gRPC messages get INVALID_ARGUMENT
and the stage keeps serving; a prompt over the context limit gets HTTP 400 naming the limit;
a client that disconnects frees its sequence on every stage; a stage that is down makes
requests fail fast with 503 and a reason, leaking no cache, and the pipeline recovers when
the stage comes back; a stuck stage makes requests fail after the step timeout; /readyz asks
every stage at once, within the probe's timeout. Resuming is off here (`--resume-timeout 0`):
these are the failures a client gets when no chain comes back (tests/dataplane/test_resume.py
covers the pause)."""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import openai
import pytest
import torch

from llmpipe_stage import wire
from llmpipe_stage.proto import stage_pb2, stage_pb2_grpc
from tests.dataplane import pipelines

CONTEXT = 1000


@pytest.fixture(scope="module")
def pipeline(model_dirs: dict[str, Path], start_pipeline) -> Iterator[pipelines.Pipeline]:
    yield start_pipeline(
        model_dirs["llama-gqa"],
        stages=3,
        max_context=CONTEXT,
        extra_args=("--step-timeout", "4", "--resume-timeout", "0"),
    )


@pytest.fixture(scope="module")
def client(pipeline: pipelines.Pipeline) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{pipeline.base_url}/v1", api_key="unused", max_retries=0)


def serves(client: openai.OpenAI) -> bool:
    result = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=3, temperature=0)
    return result.usage is not None and result.usage.completion_tokens >= 1


def forward(pipeline: pipelines.Pipeline, stage: int, message: stage_pb2.Activations) -> None:
    with pipeline.channel(stage, as_stage=stage - 1) as channel:
        stage_pb2_grpc.StageStub(channel).Forward(message, timeout=5)


def activations(
    hidden: torch.Tensor, *, position: int = 0, length: int = 1, sequence_id: int = 77
) -> stage_pb2.Activations:
    return wire.encode_activations([wire.Step(sequence_id, position, length)], hidden)


malformed = pytest.mark.parametrize(
    ("case", "message", "says"),
    [
        ("wrong hidden size", activations(torch.zeros(1, 32)), "is not [tokens, 64]"),
        # (another float dtype is not malformed: a neighbour on another GPU may run it, and
        # the stage takes it in its own; tests/dataplane/test_devices.py)
        (
            "bytes short of the shape",
            stage_pb2.Activations(
                steps=[stage_pb2.SequenceStep(sequence_id=1, position=0, length=1)],
                hidden=stage_pb2.Tensor(dtype=stage_pb2.FLOAT32, shape=[1, 64], data=b"\0" * 10),
            ),
            "needs 256",
        ),
        ("steps disagree with tokens", activations(torch.zeros(3, 64), length=2), "cover 2 tokens"),
        (
            "position of an unknown sequence",
            activations(torch.zeros(1, 64), position=5),
            "expected 0",
        ),
        (
            "past the context limit",
            activations(torch.zeros(1, 64), position=0, length=1, sequence_id=78).__class__(
                steps=[stage_pb2.SequenceStep(sequence_id=79, position=0, length=CONTEXT + 1)],
                hidden=wire.encode_tensor(torch.zeros(CONTEXT + 1, 64)),
            ),
            "context limit",
        ),
        ("no steps", stage_pb2.Activations(), "no sequence steps"),
    ],
)


@malformed
def test_malformed_message_is_invalid_argument_and_the_stage_keeps_serving(
    pipeline: pipelines.Pipeline,
    client: openai.OpenAI,
    case: str,
    message: stage_pb2.Activations,
    says: str,
) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        forward(pipeline, 1, message)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
    assert says in raised.value.details()
    assert serves(client)
    assert pipeline.cached_sequences() == {0: [], 1: [], 2: []}


def test_prompt_longer_than_the_context_is_400_naming_the_limit(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model="tiny", prompt=[7] * (CONTEXT + 5), max_tokens=4)
    assert f"context limit is {CONTEXT} tokens" in str(raised.value)
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model="tiny", prompt=[7] * 10, max_tokens=CONTEXT)
    assert f"lower max_tokens to {CONTEXT - 10}" in str(raised.value)


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)


def test_client_disconnect_frees_the_sequence_everywhere(pipeline: pipelines.Pipeline) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", pipeline.http_ports[0], timeout=30)
    body = {
        "model": "tiny",
        "prompt": [5, 6, 7],
        "max_tokens": CONTEXT - 10,
        "temperature": 1.0,
        "seed": 1,
        "stream": True,
    }
    connection.request(
        "POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"}
    )
    response = connection.getresponse()
    assert response.status == 200
    for _ in range(3):
        assert response.readline().startswith(b"data: ")
        response.readline()
    held = pipeline.cached_sequences()
    assert all(len(ids) == 1 for ids in held.values()), held  # in flight on every stage
    connection.close()
    assert pipeline.wait_no_cache() == {0: [], 1: [], 2: []}
    assert serves(openai.OpenAI(base_url=f"{pipeline.base_url}/v1", api_key="x", max_retries=0))


def stream_lines(pipeline: pipelines.Pipeline, body: dict[str, object]) -> Iterator[bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", pipeline.http_ports[0], timeout=30)
    connection.request(
        "POST",
        "/v1/completions",
        json.dumps({**body, "stream": True}),
        {"Content-Type": "application/json"},
    )
    response = connection.getresponse()
    assert response.status == 200
    try:
        while line := response.readline():
            if line.strip():
                yield line
    finally:
        connection.close()


def test_stuck_stage_is_503_before_admission(
    pipeline: pipelines.Pipeline,
    client: openai.OpenAI,
) -> None:
    time.sleep(1.2)  # an idle ring: stage 0 checks every stage before admitting a request
    pipeline.processes[1].send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(openai.InternalServerError) as raised:
            client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=5, timeout=30)
        took = time.monotonic() - started
    finally:
        pipeline.processes[1].send_signal(signal.SIGCONT)
    assert raised.value.status_code == 503
    assert f"stage 1 at 127.0.0.1:{pipeline.grpc_ports[1]} is unreachable" in str(raised.value)
    assert took < 5, f"took {took:.1f} s to fail"
    assert serves(client)


def test_stage_stuck_mid_stream_fails_the_request_after_the_step_timeout(
    pipeline: pipelines.Pipeline,
    client: openai.OpenAI,
) -> None:
    lines = stream_lines(
        pipeline,
        {
            "model": "tiny",
            "prompt": [5, 6, 7],
            "seed": 2,
            "max_tokens": CONTEXT - 10,
            "temperature": 1.0,
        },
    )
    assert next(lines).startswith(b"data: {")
    pipeline.processes[1].send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        rest = list(lines)
        took = time.monotonic() - started
    finally:
        pipeline.processes[1].send_signal(signal.SIGCONT)
    last = json.loads(rest[-1].removeprefix(b"data: "))
    assert "no token came back from the pipeline within 4 s" in last["error"]["message"]
    assert 3 < took < 15
    assert pipeline.wait_no_cache() == {0: [], 1: [], 2: []}
    assert serves(client)


def test_stage_down_fails_fast_with_503_and_recovers(
    pipeline: pipelines.Pipeline,
    client: openai.OpenAI,
) -> None:
    pipeline.kill(2)
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as raised:
        client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=5, timeout=30)
    took = time.monotonic() - started
    assert raised.value.status_code == 503
    assert f"stage 2 at 127.0.0.1:{pipeline.grpc_ports[2]}" in str(raised.value)
    assert took < 5, f"took {took:.1f} s to fail"
    assert pipeline.wait_no_cache(stages=[0, 1]) == {0: [], 1: []}
    # The stage comes back (same address): the pipeline serves again without a restart.
    pipeline.spawn(2)
    pipeline.wait_ready(120)
    assert serves(client)
    assert pipeline.wait_no_cache() == {0: [], 1: [], 2: []}


def test_readyz_asks_every_stage_at_once_within_the_probe_timeout(
    pipeline: pipelines.Pipeline,
) -> None:
    """Stage 1 answers 1.6 s late, and stage 2 stops just as stage 1 resumes: asked one
    after the other, the stages would take 3.2 s, past the kubelet's 3 s probe timeout;
    asked at once, both answers are in after 1.6 s, within the 2 s budget."""
    first, second = pipeline.processes[1], pipeline.processes[2]

    def late_answers() -> None:
        time.sleep(1.6)
        second.send_signal(signal.SIGSTOP)
        first.send_signal(signal.SIGCONT)
        time.sleep(1.6)
        second.send_signal(signal.SIGCONT)

    first.send_signal(signal.SIGSTOP)
    timer = threading.Thread(target=late_answers)
    timer.start()
    try:
        status, body = pipelines.http_json(f"{pipeline.base_url}/readyz", timeout=3)
    finally:
        timer.join()
        first.send_signal(signal.SIGCONT)
        second.send_signal(signal.SIGCONT)
    assert status == 200, body
    assert body["reason"] == "all stages ready"
