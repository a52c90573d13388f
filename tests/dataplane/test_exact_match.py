"""Exact match: greedy tokens from 1, 2, 3 and 4 stage processes equal single-process
`model.generate`, for several concurrent requests of different prompt and output lengths,
on two families (Llama with grouped-query attention, Qwen2 with tied embeddings)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.dataplane import pipelines

PROMPTS = [[5, 17, 40, 99, 12, 7, 230], [33, 8, 150], list(range(60, 80)), [120]]
MAX_NEW = [14, 20, 9, 17]

families = pytest.mark.parametrize("family", sorted(pipelines.FAMILIES))
stage_counts = pytest.mark.parametrize("stages", [1, 2, 3, 4])


@pytest.fixture(scope="module")
def references(model_dirs: dict[str, Path]) -> dict[str, list[list[int]]]:
    return {
        name: pipelines.reference_tokens(path, PROMPTS, MAX_NEW)
        for name, path in model_dirs.items()
    }


@families
@stage_counts
def test_greedy_tokens_equal_single_process_generate(
    family: str,
    stages: int,
    model_dirs: dict[str, Path],
    start_pipeline,
    references: dict[str, list[list[int]]],
) -> None:
    pipeline = start_pipeline(model_dirs[family], stages=stages)
    try:
        got = pipelines.complete_concurrently(pipeline, PROMPTS, MAX_NEW)
        assert got == references[family]
        # The ring really ran through every stage, and every cache was freed afterwards.
        assert [pipeline.info(i).layer_start for i in range(stages)] == [
            s["layerStart"] for s in pipelines.stage_config.even_plan(4, stages)["stages"]
        ]
        assert pipeline.wait_no_cache() == {i: [] for i in range(stages)}
    finally:
        pipeline.stop()
