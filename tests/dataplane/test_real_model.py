"""The shipped real model, SmolLM2-135M-Instruct from its GGUF file, through real stage
processes: the converted weights equal transformers' own GGUF dequantization tensor for
tensor; greedy chat and completion tokens over 1, 2, 3 and 4 stages equal single-process
`generate` on the same converted weights, for concurrent requests of different lengths;
and a few sanity prompts answer sensibly (a smoke test of the whole path)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.dataplane import pipelines

NAME = "SmolLM2-135M-Instruct"
COMPLETIONS = [
    ("The three primary colors are", 14),
    ("def fibonacci(n):\n    ", 20),
]
CHATS = [
    ("Name a fruit that is yellow.", 10),
    ("Write one sentence about the sea, and keep it short please.", 18),
]
stage_counts = pytest.mark.parametrize("stages", [1, 2, 3, 4])


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def chat_ids(tokenizer: Any, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    return list(tokenizer.encode(rendered, add_special_tokens=False))


@pytest.fixture(scope="module")
def references(smollm2_dir: Path, tokenizer: Any) -> list[list[int]]:
    prompts = [tokenizer.encode(p) for p, _ in COMPLETIONS]
    prompts += [chat_ids(tokenizer, c) for c, _ in CHATS]
    lengths = [n for _, n in COMPLETIONS] + [n for _, n in CHATS]
    return pipelines.reference_tokens(smollm2_dir, prompts, lengths)


def request(pipeline: pipelines.Pipeline, kind: str, text: str, n: int) -> list[int]:
    body: dict[str, Any] = {"model": NAME, "max_tokens": n, "temperature": 0}
    body["return_token_ids"] = True
    if kind == "chat":
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    path = "chat/completions" if kind == "chat" else "completions"
    status, reply = pipelines.http_json(f"{pipeline.base_url}/v1/{path}", body, timeout=120)
    assert status == 200, reply
    return list(reply["choices"][0]["token_ids"])


def test_converted_weights_equal_transformers_gguf_dequantization(
    smollm2_gguf: Path, smollm2_dir: Path
) -> None:
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).state_dict()
    ours: dict[str, torch.Tensor] = {}
    for shard in sorted(smollm2_dir.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            ours.update({key: handle.get_tensor(key) for key in handle.keys()})  # noqa: SIM118
    # Tied embeddings: transformers lists lm_head as the same tensor as the embeddings.
    assert set(ours) == set(reference) - {"lm_head.weight"}
    assert torch.equal(reference["lm_head.weight"], ours["model.embed_tokens.weight"])
    for key, value in ours.items():
        assert value.dtype == torch.float32
        assert torch.equal(value, reference[key]), key


@stage_counts
def test_greedy_tokens_equal_single_process_generate(
    stages: int, smollm2_dir: Path, start_pipeline, references: list[list[int]]
) -> None:
    pipeline = start_pipeline(smollm2_dir, stages=stages, name=NAME, max_context=512)
    try:
        jobs = [("completion", p, n) for p, n in COMPLETIONS]
        jobs += [("chat", c, n) for c, n in CHATS]
        with ThreadPoolExecutor(len(jobs)) as pool:
            got = list(pool.map(lambda job: request(pipeline, *job), jobs))
        assert got == references
        assert pipeline.wait_no_cache() == {i: [] for i in range(stages)}
    finally:
        pipeline.stop()
