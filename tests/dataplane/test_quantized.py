"""Weight-only int8 (`quantization: int8`): quality on the real model and the fused decode
step's agreement with transformers' layers. Greedy exact match is not expected of int8, so
its bar is perplexity: within 2 % of bfloat16 on SmolLM2-135M over the repo's README."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from llmpipe_stage import loading, runtime, wire
from llmpipe_stage.proto import stage_pb2

ROOT = Path(__file__).resolve().parents[2]
SCORED_TOKENS = 384


def whole_model(model_dir: Path, *, dtype: torch.dtype, quantization: str) -> runtime.StageRuntime:
    config = loading.load_config(model_dir)
    stage = loading.build_slice(
        model_dir,
        layer_start=0,
        layer_end=config.num_hidden_layers,
        has_embedding=True,
        has_head=True,
        dtype=dtype,
    )
    return runtime.StageRuntime(stage, context_limit=1024, quantization=quantization)


def perplexity(stage: runtime.StageRuntime, ids: list[int]) -> float:
    """exp(-mean log P(token | prefix)) over ids[1:], scored as one prompt."""
    sampling = stage_pb2.Sampling(prompt_token_ids=ids[1:])
    steps = [wire.Step(0, 0, len(ids), sampling)]
    hidden = stage.run(steps, stage.embed(ids))
    scored = stage.sample_scored(steps, hidden).prompt_logprobs[0]
    stage.release([0])
    return math.exp(-sum(scored) / len(scored))


@pytest.fixture(scope="module")
def readme_ids(smollm2_dir: Path) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tokenizer((ROOT / "README.md").read_text())["input_ids"]
    assert len(ids) > SCORED_TOKENS
    return list(ids[:SCORED_TOKENS])


def test_int8_perplexity_is_within_two_percent_of_bfloat16(
    smollm2_dir: Path, readme_ids: list[int]
) -> None:
    torch.set_num_threads(1)
    bf16 = perplexity(
        whole_model(smollm2_dir, dtype=torch.bfloat16, quantization="none"), readme_ids
    )
    int8 = perplexity(
        whole_model(smollm2_dir, dtype=torch.bfloat16, quantization="int8"), readme_ids
    )
    print(
        f"\nSmolLM2-135M perplexity over {SCORED_TOKENS} README tokens: "
        f"bf16 {bf16:.3f}, int8 {int8:.3f}"
    )
    # A real model on English text: far below a random model's ~vocabulary size.
    assert bf16 < 100
    assert int8 <= bf16 * 1.02


def test_int8_weights_are_half_of_bfloat16(smollm2_dir: Path) -> None:
    bf16 = whole_model(smollm2_dir, dtype=torch.bfloat16, quantization="none")
    int8 = whole_model(smollm2_dir, dtype=torch.bfloat16, quantization="int8")
    layers_bf16 = sum(p.nbytes() for f in bf16.fused for p in (f.qkv, f.out, f.gate_up, f.down))
    layers_int8 = sum(p.nbytes() for f in int8.fused for p in (f.qkv, f.out, f.gate_up, f.down))
    assert layers_int8 < 0.51 * layers_bf16
    assert all(f.qkv.weight.dtype == torch.int8 for f in int8.fused)


@pytest.mark.parametrize("family", ["llama-gqa", "qwen2-tied"])
def test_the_planner_sizes_int8_at_the_bytes_the_stage_holds(tmp_path: Path, family: str) -> None:
    """spec.model.quantization int8: the profile's bytes (layers + embeddings + head) equal
    what an int8 stage of the whole model computes with, byte for byte (untied Llama;
    Qwen2 with q/k/v biases and tied embeddings: the head is its own int8 copy)."""
    import json

    from llmpipe_operator.planning import profiles
    from tests.dataplane import pipelines

    model_dir = pipelines.write_family(tmp_path, family)
    config = json.loads((model_dir / "config.json").read_text())
    profile = profiles.from_config(config, dtype="bfloat16", quantization="int8")
    stage = whole_model(model_dir, dtype=torch.bfloat16, quantization="int8")
    planned = sum(profile.layer_bytes) + profile.embed_bytes + profile.head_bytes
    assert planned == stage.weight_bytes()
    assert profile.weight_bytes_per_param == 1


@pytest.mark.parametrize("rows", [1, 5, 17, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_quantization_in_row_blocks_equals_the_whole_matrix_formula(
    monkeypatch: pytest.MonkeyPatch, rows: int, dtype: torch.dtype
) -> None:
    """Rows are quantized a few MB at a time (the load's peak); the result is the same
    as the formula over the whole matrix, at every block boundary."""
    from llmpipe_stage import decode

    weight = (torch.randn(rows, 37, generator=torch.Generator().manual_seed(rows)) * 3).to(dtype)
    weight[0, 5] = 0  # a row's zero stays zero
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    expected = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    monkeypatch.setattr(decode, "QUANTIZE_BLOCK_BYTES", 4 * 37 * 4)  # 4 rows a block
    q, got_scales = decode.quantize_int8(weight, scale_dtype=dtype)
    assert q.dtype == torch.int8 and q.shape == weight.shape
    assert torch.equal(q, expected)
    assert torch.equal(got_scales, scales.to(dtype))
    assert int(q.abs().max()) == 127  # every row's largest weight maps to +-127
