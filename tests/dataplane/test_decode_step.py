"""The fused decode step over the slot cache: it equals transformers' `generate` when slots
run out (the pool grows), when slots are reused after a release (stale keys of the old
sequence in them), and when the batch's slots are not one run (the gather path)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmpipe_stage import loading, runtime, wire
from tests.dataplane import pipelines


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pipelines.write_family(tmp_path_factory.mktemp("llama"), "llama-gqa")


def whole(model_dir: Path, *, max_sequences: int) -> runtime.StageRuntime:
    stage = loading.build_whole(model_dir, dtype=torch.float32)
    return runtime.StageRuntime(stage, context_limit=128, max_sequences=max_sequences)


def generate(
    stage: runtime.StageRuntime, ids: dict[int, list[int]], new: int
) -> dict[int, list[int]]:
    """Prefill each prompt alone, then decode all sequences as one batch per step."""
    got: dict[int, list[int]] = {}
    for sid, prompt in ids.items():
        steps = [wire.Step(sid, 0, len(prompt))]
        got[sid] = stage.sample(steps, stage.run(steps, stage.embed(prompt)))
    for k in range(new - 1):
        steps = [wire.Step(sid, len(ids[sid]) + k, 1) for sid in ids]
        tokens = stage.sample(
            steps, stage.run(steps, stage.embed([got[s.sequence_id][-1] for s in steps]))
        )
        for step, token in zip(steps, tokens, strict=True):
            got[step.sequence_id].append(token)
    return got


def test_more_sequences_than_slots_grow_the_pool(llama_dir: Path) -> None:
    prompts = [[5, 6, 7, 8, 9], [20, 21], list(range(30, 42))]
    expected = pipelines.reference_tokens(llama_dir, prompts, [8, 8, 8])
    stage = whole(llama_dir, max_sequences=1)
    got = generate(stage, dict(enumerate(prompts)), 8)
    assert [got[i] for i in range(3)] == expected
    assert stage.pool.slots >= 3


def test_reused_and_scattered_slots_still_equal_generate(llama_dir: Path) -> None:
    first = [list(range(40, 70)), [3, 4], list(range(90, 110)), [7, 8, 9]]
    stage = whole(llama_dir, max_sequences=4)
    generate(stage, dict(enumerate(first)), 6)  # fills slots 0-3 with keys
    assert stage.release([0, 2]) == [0, 2]  # slots 0 and 2 free, holding stale keys
    assert stage.cache_bytes() == stage.pool.token_bytes() * (2 + 5 + 3 + 5)
    second = [[11, 12, 13], [50, 51, 52, 53, 54, 55, 56]]
    expected = pipelines.reference_tokens(llama_dir, second, [7, 7])
    got = generate(stage, {10: second[0], 11: second[1]}, 7)
    assert [got[10], got[11]] == expected
    # The new sequences took the freed slots 0 and 2: not one run, so their decode batch
    # read its keys through the gather path.
    assert (stage.caches[10].slot, stage.caches[11].slot) == (0, 2)
