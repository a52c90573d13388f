"""Chunked, pipelined prefill: greedy tokens with prompts cut into chunks (of 1 token, of
sizes that do not divide the prompt, of sizes above it) equal single-process `generate`,
for 1-4 stage processes on both synthetic families, with several concurrent requests so
chunks interleave with other sequences' decode steps; every cache is freed afterwards."""

from __future__ import annotations

import math
import re
import urllib.request
from pathlib import Path

import pytest

from tests.dataplane import pipelines

PROMPTS = [list(range(3, 60)), [5, 17, 40, 99, 12, 7, 230], list(range(200, 100, -3)), [120]]
MAX_NEW = [12, 16, 9, 10]


@pytest.fixture(scope="module")
def references(model_dirs: dict[str, Path]) -> dict[str, list[list[int]]]:
    return {
        name: pipelines.reference_tokens(path, PROMPTS, MAX_NEW)
        for name, path in model_dirs.items()
    }


@pytest.mark.parametrize(
    ("family", "stages", "chunk"),
    [
        ("llama-gqa", 1, 5),
        ("llama-gqa", 2, 1),
        ("llama-gqa", 4, 16),
        ("qwen2-tied", 3, 13),
        ("qwen2-tied", 4, 64),
    ],
)
def test_chunked_prefill_equals_single_process_generate(
    family: str,
    stages: int,
    chunk: int,
    model_dirs: dict[str, Path],
    start_pipeline,
    references: dict[str, list[list[int]]],
) -> None:
    pipeline = start_pipeline(
        model_dirs[family], stages=stages, workload={"prefillChunkTokens": chunk}
    )
    try:
        got = pipelines.complete_concurrently(pipeline, PROMPTS, MAX_NEW)
        assert got == references[family]
        # the prompts really went as chunks: every prompt longer than a chunk (prompts
        # prefilling at once share a micro-batch's budget, so some chunks are shorter)
        concurrent = chunks_sent(pipeline)
        assert concurrent >= sum(math.ceil(len(p) / chunk) for p in PROMPTS if len(p) > chunk)
        # one long prompt alone: its chunks flow back to back through every stage
        assert pipelines.complete(pipeline, PROMPTS[0], MAX_NEW[0]) == references[family][0]
        alone = math.ceil(len(PROMPTS[0]) / chunk) if len(PROMPTS[0]) > chunk else 0
        assert chunks_sent(pipeline) - concurrent == alone  # a chunk past it: sent whole
        assert pipeline.wait_no_cache() == {i: [] for i in range(stages)}
    finally:
        pipeline.stop()


def chunks_sent(pipeline: pipelines.Pipeline) -> float:
    text = urllib.request.urlopen(f"{pipeline.base_url}/metrics", timeout=10).read().decode()
    match = re.search(r"^llmpipe_prefill_chunks_total (\S+)$", text, re.MULTILINE)
    assert match is not None, text
    return float(match.group(1))


@pytest.mark.parametrize(("stages", "chunk"), [(2, 1), (4, 24)])
def test_chunked_prefill_of_the_real_model_equals_single_process_generate(
    stages: int, chunk: int, smollm2_dir: Path, start_pipeline
) -> None:
    from transformers import AutoTokenizer

    from tests.dataplane.test_real_model import NAME, PARAGRAPH

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompts = [
        tokenizer.encode(f"Summarise in one sentence: {PARAGRAPH}\nSummary:"),
        tokenizer.encode("def fibonacci(n):\n    "),
    ]
    lengths = [16, 12]
    expected = pipelines.reference_tokens(smollm2_dir, prompts, lengths)
    pipeline = start_pipeline(
        smollm2_dir,
        stages=stages,
        name=NAME,
        max_context=512,
        workload={"prefillChunkTokens": chunk},
    )
    try:
        got = pipelines.complete_concurrently(pipeline, prompts, lengths, model=NAME)
        assert got == expected
        cut = [math.ceil(len(p) / chunk) for p in prompts if len(p) > chunk]
        assert chunks_sent(pipeline) >= sum(cut) > 0  # concurrent prompts share a budget
        assert pipeline.wait_no_cache() == {i: [] for i in range(stages)}
    finally:
        pipeline.stop()
