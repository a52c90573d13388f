"""Speculative decoding with prompt-lookup drafts through real stage processes: greedy
tokens equal single-process `generate` for 1-4 stages and draft bounds of 1, 3 and 8, on
prompts that repeat (so drafts are made) and prompts that do not, several requests at once
and one at a time; the synthetic models' random text rejects nearly every draft, so this
exercises the rollback on every stage. On the real model, a code-editing prompt whose
answer copies its input, over 2 and 4 stages: drafts accepted, tokens still exact. The
acceptance counters in /metrics moved; every cache is freed afterwards. (Forced full
acceptance and rejection for k = 1..8: test_verify_step.)"""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import pytest

from tests.dataplane import pipelines

PROMPTS = [
    [5, 6, 7, 8, 9] * 6,
    [11, 12, 13, 11, 12, 13, 40, 41, 11, 12, 13, 11, 12],
    list(range(60, 80)),
    [120, 7],
]
MAX_NEW = [24, 20, 16, 18]


@pytest.fixture(scope="module")
def references(model_dirs: dict[str, Path]) -> dict[str, list[list[int]]]:
    return {
        name: pipelines.reference_tokens(path, PROMPTS, MAX_NEW)
        for name, path in model_dirs.items()
    }


def counters(pipeline: pipelines.Pipeline) -> tuple[float, float]:
    text = urllib.request.urlopen(f"{pipeline.base_url}/metrics", timeout=10).read().decode()
    found = []
    for name in ("llmpipe_draft_tokens_total", "llmpipe_accepted_draft_tokens_total"):
        match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        assert match is not None, text
        found.append(float(match.group(1)))
    return found[0], found[1]


@pytest.mark.parametrize(
    ("family", "stages", "max_draft"),
    [
        ("llama-gqa", 1, 8),
        ("llama-gqa", 2, 1),
        ("llama-gqa", 4, 3),
        ("qwen2-tied", 3, 8),
        ("qwen2-tied", 4, 1),
    ],
)
def test_speculative_greedy_tokens_equal_single_process_generate(
    family: str,
    stages: int,
    max_draft: int,
    model_dirs: dict[str, Path],
    start_pipeline,
    references: dict[str, list[list[int]]],
) -> None:
    pipeline = start_pipeline(
        model_dirs[family],
        stages=stages,
        workload={"speculation": "ngram", "maxDraftTokens": max_draft, "prefillChunkTokens": 8},
    )
    try:
        got = pipelines.complete_concurrently(pipeline, PROMPTS, MAX_NEW)
        assert got == references[family]
        # alone, one after the other (one sequence's rollbacks with nothing beside it)
        for prompt, n, expected in zip(PROMPTS, MAX_NEW, references[family], strict=True):
            assert pipelines.complete(pipeline, prompt, n) == expected
        drafted, accepted = counters(pipeline)
        assert drafted > 0
        assert 0 <= accepted <= drafted
        assert pipeline.wait_no_cache() == {i: [] for i in range(stages)}
    finally:
        pipeline.stop()


CODE = """def area(width, height):
    return width * height


def perimeter(width, height):
    return 2 * (width + height)
"""


@pytest.mark.parametrize("stages", [2, 4])
def test_speculation_on_the_real_model_accepts_drafts_and_stays_exact(
    stages: int, smollm2_dir: Path, start_pipeline
) -> None:
    from transformers import AutoTokenizer

    from tests.dataplane.test_real_model import NAME

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    text = f"Rename width to w in this code:\n{CODE}\nThe code with width renamed to w:\n"
    prompt = tokenizer.encode(text)
    expected = pipelines.reference_tokens(smollm2_dir, [prompt], [40])[0]
    pipeline = start_pipeline(
        smollm2_dir,
        stages=stages,
        name=NAME,
        max_context=512,
        workload={"speculation": "ngram", "maxDraftTokens": 8},
    )
    try:
        status, body = pipelines.http_json(
            f"{pipeline.base_url}/v1/completions",
            {
                "model": NAME,
                "prompt": prompt,
                "max_tokens": 40,
                "temperature": 0,
                "return_token_ids": True,
            },
        )
        assert status == 200, body
        assert body["choices"][0]["token_ids"] == expected
        drafted, accepted = counters(pipeline)
        assert 0 < accepted <= drafted
        assert pipeline.wait_no_cache() == {i: [] for i in range(stages)}
    finally:
        pipeline.stop()


def test_sampled_requests_speculate_and_a_seed_reproduces_them(
    model_dirs: dict[str, Path], start_pipeline
) -> None:
    """A sampled request now drafts too (its drafts verified by the accept/reject rule at
    the last stage, whose distribution is tested in test_speculative_sampling): over two
    stages the draft counters move, a seed gives the same tokens twice, and every cache is
    freed afterwards."""
    pipeline = start_pipeline(
        model_dirs["llama-gqa"], stages=2, workload={"speculation": "ngram", "maxDraftTokens": 4}
    )

    def sampled(seed: int) -> list[int]:
        status, body = pipelines.http_json(
            f"{pipeline.base_url}/v1/completions",
            {
                "model": "tiny",
                "prompt": PROMPTS[0],
                "max_tokens": 24,
                "temperature": 0.8,
                "seed": seed,
                "ignore_eos": True,
                "return_token_ids": True,
            },
        )
        assert status == 200, body
        return list(body["choices"][0]["token_ids"])

    try:
        first = sampled(7)
        assert len(first) == 24
        assert sampled(7) == first
        drafted, accepted = counters(pipeline)
        assert drafted > 0
        assert 0 <= accepted <= drafted
        assert pipeline.wait_no_cache() == {i: [] for i in range(2)}
    finally:
        pipeline.stop()


def test_unset_speculation_is_auto_greedy_requests_only(
    model_dirs: dict[str, Path], start_pipeline, references: dict[str, list[list[int]]]
) -> None:
    """pipeline.json without workload.speculation is `auto`: a sampled request drafts
    nothing (the counters stay at 0), a greedy one drafts and its tokens are still
    single-process `generate`'s."""
    pipeline = start_pipeline(model_dirs["llama-gqa"], stages=2, workload={"speculation": None})
    try:
        status, body = pipelines.http_json(
            f"{pipeline.base_url}/v1/completions",
            {
                "model": "tiny",
                "prompt": PROMPTS[0],
                "max_tokens": 24,
                "temperature": 0.8,
                "seed": 7,
                "ignore_eos": True,
            },
        )
        assert status == 200, body
        assert counters(pipeline) == (0.0, 0.0)
        assert pipelines.complete(pipeline, PROMPTS[0], MAX_NEW[0]) == references["llama-gqa"][0]
        drafted, accepted = counters(pipeline)
        assert drafted > 0
        assert 0 <= accepted <= drafted
    finally:
        pipeline.stop()
