"""Device placement of a stage, the parts that run without a GPU.

Covers: `devices.place` (the plan's device and dtype win; `auto` picks the CPU when torch
sees no GPU; `cuda` without one fails with what to do), the chunked file -> staging ->
device reader that GPU stages load through (bit-exact against safetensors' own reader,
with a staging buffer smaller than the tensors), the wire taking a neighbour's dtype, and
the plan's device and dtype fields in plan.json, a stage planned on a GPU it cannot see
exiting with what to do. The GPU side is tests/dataplane/test_gpu.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from llmpipe_stage import config as stage_config
from llmpipe_stage import devices, loading, wire
from tests.dataplane import pipelines

ROOT = Path(__file__).resolve().parents[2]
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")


def test_the_plans_device_and_dtype_win() -> None:
    placed = devices.place(device="cpu", plan_dtype="float16", pipeline_dtype="float32")
    assert (placed.device.type, placed.dtype) == ("cpu", torch.float16)
    placed = devices.place(device="cpu", plan_dtype="", pipeline_dtype="float32")
    assert placed.dtype == torch.float32


@no_gpu
def test_auto_runs_on_the_cpu_without_a_gpu_in_the_cpu_auto_dtype() -> None:
    placed = devices.place(device="", plan_dtype="", pipeline_dtype="auto")
    assert (placed.device.type, placed.dtype, placed.on_gpu) == ("cpu", torch.bfloat16, False)


@no_gpu
def test_a_stage_planned_on_a_gpu_without_one_says_what_to_do() -> None:
    with pytest.raises(devices.DeviceError, match="CUDA stage image"):
        devices.place(device="cuda", plan_dtype="bfloat16", pipeline_dtype="auto")


def test_to_host_leaves_cpu_tensors_alone() -> None:
    tensor = torch.ones(2, 3)
    assert devices.to_host(tensor) is tensor


def test_the_chunked_device_reader_equals_safetensors(
    model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = model_dirs["llama-gqa"]
    keys = loading.tensor_files(model_dir)
    wanted = list(keys)
    # a staging buffer smaller than most tensors: every chunk boundary is exercised
    monkeypatch.setattr(loading, "STAGING_BYTES", 1000)
    got = loading.read_tensors_to_device(
        keys, wanted, dtype=torch.float32, device=torch.device("cpu")
    )
    for path in set(keys.values()):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                expected = handle.get_tensor(key).to(torch.float32)
                assert torch.equal(got[key], expected), key
    halves = loading.read_tensors_to_device(
        keys, wanted[:2], dtype=torch.bfloat16, device=torch.device("cpu")
    )
    assert all(t.dtype == torch.bfloat16 for t in halves.values())


def test_a_neighbours_dtype_is_taken_in_ours() -> None:
    steps = [wire.Step(sequence_id=1, position=0, length=2)]
    hidden = torch.randn(2, 8, dtype=torch.bfloat16)
    message = wire.encode_activations(steps, hidden)
    _, decoded = wire.decode_activations(message, hidden_size=8, dtype=torch.float16)
    assert decoded.dtype == torch.float16
    assert torch.equal(decoded, hidden.to(torch.float16))


def test_plan_json_device_and_dtype_reach_the_stage_config() -> None:
    plan = stage_config.even_plan(4, 2)
    plan["stages"][1].update(device="cuda", dtype="float16")
    stages = stage_config.parse_plan(plan)
    assert (stages[0].device, stages[0].dtype) == ("", "")
    assert (stages[1].device, stages[1].dtype) == ("cuda", "float16")
    plan["stages"][1]["device"] = "tpu"
    with pytest.raises(stage_config.ConfigError, match="'device' must be one of"):
        stage_config.parse_plan(plan)


def test_a_cpu_pipeline_planned_with_devices_serves(
    model_dirs: dict[str, Path], start_pipeline: Callable[..., pipelines.Pipeline]
) -> None:
    """Two stages whose plan names device cpu and dtype float32, as the operator writes
    it for CPU nodes: the tokens equal single-process generate."""
    model_dir = model_dirs["llama-gqa"]
    prompt, new = [5, 17, 40, 99], 8
    (expected,) = pipelines.reference_tokens(model_dir, [prompt], [new])
    pipeline = start_pipeline(model_dir, stages=2, device="cpu", dtype="float32")
    status, body = pipelines.http_json(
        f"{pipeline.base_url}/v1/completions",
        {
            "model": "tiny",
            "prompt": prompt,
            "max_tokens": new,
            "temperature": 0,
            "return_token_ids": True,
        },
    )
    assert status == 200, body
    assert body["choices"][0]["token_ids"] == expected


@no_gpu
def test_a_stage_planned_on_a_missing_gpu_fails_to_load_and_says_why(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    model_dir = model_dirs["llama-gqa"]
    plan = stage_config.even_plan(4, 1)
    plan["stages"][0].update(device="cuda", dtype="bfloat16")
    grpc_port, http_port = pipelines.free_ports(2)
    pipeline = {
        "model": {"name": "tiny", "dtype": "bfloat16"},
        "workload": {"maxSequences": 2, "maxContextTokens": 64},
        "stages": [{"index": 0, "address": f"127.0.0.1:{grpc_port}"}],
    }
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    (tmp_path / "pipeline.json").write_text(json.dumps(pipeline))
    command = [sys.executable, "-m", "llmpipe_stage", "--config-dir", str(tmp_path)]
    command += ["--stage-index", "0", "--model-dir", str(model_dir), "--plaintext"]
    command += ["--host", "127.0.0.1", "--grpc-port", str(grpc_port)]
    command += ["--http-port", str(http_port)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'stage_image'}:{ROOT}"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "torch sees no CUDA device" in done.stderr
    assert "spec.runtime.device: cpu" in done.stderr


def test_serve_passes_its_device_to_every_stage(tmp_path: Path) -> None:
    """`llmpipe serve --device cpu`: each stage says it computes on the CPU."""
    args = ["--model", "demo", "--stages", "2", "--device", "cpu", "--run-dir", str(tmp_path)]
    with pipelines.serving(args, timeout=300, cache=tmp_path / "cache") as served:
        assert pipelines.READY_LINE in served.output, served.output
    for index in range(2):
        log = (tmp_path / f"stage-{index}.log").read_text()
        assert "on cpu," in log, log[-2000:]
