"""Stages on a GPU (marked `gpu`; skipped with the reason where torch sees no CUDA device).

Covers: greedy tokens from 1, 2, 3 and 4 stage processes sharing one GPU (float32, plan
device cuda) equal single-process `generate` on the same GPU, with caches freed after;
a GPU stage loads its slice straight to the device (the process's peak host RSS grows far
less than the slice, while a CPU load of the same slice grows by about the slice); the KV
caches live on the device and releasing a sequence gives its device memory back.
`bench/gpu.py` runs these and the GPU benchmark as one script on a GPU machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from tests.dataplane import pipelines  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CUDA = torch.cuda.is_available()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not CUDA, reason="CUDA is not available: torch sees no GPU here"),
]

PROMPTS = [[5, 17, 40, 99, 12, 7, 230], [33, 8, 150], list(range(60, 80)), [120]]
MAX_NEW = [14, 20, 9, 17]


@pytest.fixture(scope="module")
def gpu_references(model_dirs: dict[str, Path]) -> dict[str, list[list[int]]]:
    return {
        name: pipelines.reference_tokens(path, PROMPTS, MAX_NEW, device="cuda")
        for name, path in model_dirs.items()
    }


@pytest.mark.parametrize("family", sorted(pipelines.FAMILIES))
@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_greedy_tokens_on_one_gpu_equal_generate_on_it(
    family: str,
    stages: int,
    model_dirs: dict[str, Path],
    start_pipeline: Callable[..., pipelines.Pipeline],
    gpu_references: dict[str, list[list[int]]],
) -> None:
    pipeline = start_pipeline(model_dirs[family], stages=stages, device="cuda", dtype="float32")
    try:
        got = pipelines.complete_concurrently(pipeline, PROMPTS, MAX_NEW)
        assert got == gpu_references[family]
        assert pipeline.wait_no_cache() == {i: [] for i in range(stages)}
        assert "cuda" in pipeline.logs()  # every stage said where it computes
    finally:
        pipeline.stop()


LOAD_PROBE = r"""
import json, sys, torch
from pathlib import Path
from llmpipe_stage import loading

def peak_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

device = torch.device(sys.argv[2])
if device.type == "cuda":
    torch.empty(1, device=device)  # the CUDA context's own host memory comes first
config = loading.load_config(Path(sys.argv[1]))
before = peak_kib()
stage = loading.build_slice(
    Path(sys.argv[1]), layer_start=0, layer_end=config.num_hidden_layers,
    has_embedding=True, has_head=True, dtype=torch.float32, device=device,
)
after = peak_kib()
params = [p for layer in stage.layers for p in layer.parameters()]
params += [stage.embed.weight, stage.head_weight]
slice_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in params}.values())
print(json.dumps({
    "grew_bytes": (after - before) * 1024,
    "slice_bytes": slice_bytes,
    "on_device": all(p.device.type == device.type for p in params),
    "device_bytes": torch.cuda.memory_allocated(device) if device.type == "cuda" else 0,
}))
"""


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Llama of about 1.3 GB in float32: large next to the process's own memory."""
    from llmpipe_stage import demo

    return demo.write_model(
        tmp_path_factory.mktemp("big") / "model",
        family="llama",
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=32000,
    )


def load_in_a_process(model_dir: Path, device: str) -> dict[str, int | bool]:
    path = [str(ROOT / "stage_image"), str(ROOT), os.environ.get("PYTHONPATH", "")]
    result = subprocess.run(
        [sys.executable, "-c", LOAD_PROBE, str(model_dir), device],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ":".join(p for p in path if p)},
        timeout=600,
        check=True,
    )
    figures: dict[str, int | bool] = json.loads(result.stdout.strip().splitlines()[-1])
    return figures


def test_a_gpu_stage_loads_its_slice_without_a_host_copy(big_model: Path) -> None:
    gpu = load_in_a_process(big_model, "cuda")
    cpu = load_in_a_process(big_model, "cpu")
    slice_bytes = int(gpu["slice_bytes"])
    assert slice_bytes > 1_000_000_000
    assert gpu["on_device"] and int(gpu["device_bytes"]) >= slice_bytes
    # the same measurement sees a CPU load's copy ...
    assert int(cpu["grew_bytes"]) > 0.8 * slice_bytes
    # ... and a GPU load's host peak stays far below the slice (one staging buffer)
    assert int(gpu["grew_bytes"]) < 0.25 * slice_bytes, gpu


def test_kv_caches_live_on_the_gpu_and_release_gives_the_slots_back(
    model_dirs: dict[str, Path],
) -> None:
    from llmpipe_stage import loading, runtime, wire

    model_dir = model_dirs["llama-gqa"]
    device = torch.device("cuda", 0)
    stage = loading.build_whole(model_dir, dtype=torch.float32, device=device)
    run = runtime.StageRuntime(stage, context_limit=512, max_sequences=8)
    torch.cuda.synchronize()
    # The slot pool (8 sequences x 512 positions) is reserved on the device up front.
    assert run.pool.keys.device.type == "cuda" and run.pool.values.device.type == "cuda"
    reserved = 2 * run.pool.keys.numel() * run.pool.keys.element_size()
    assert reserved == 8 * 512 * run.pool.token_bytes()
    baseline = torch.cuda.memory_allocated(device)
    steps = [wire.Step(sequence_id=i, position=0, length=200) for i in range(8)]
    hidden = run.embed([7] * 200 * 8)
    out = run.run(steps, hidden)
    assert out.device.type == "cpu" and out.is_pinned()  # device -> page-locked host
    assert run.cache_bytes() == 8 * 200 * run.pool.token_bytes()
    assert run.release([s.sequence_id for s in steps]) == list(range(8))
    assert run.cache_bytes() == 0 and sorted(run.pool.free) == list(range(8))
    del hidden
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated(device) <= baseline + 2**20
