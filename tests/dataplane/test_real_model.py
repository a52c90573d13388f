"""The shipped real model, SmolLM2-135M-Instruct from its GGUF file, through real stage
processes: the converted weights equal transformers' own GGUF dequantization tensor for
tensor; greedy chat and completion tokens over 1, 2, 3 and 4 stages equal single-process
`generate` on the same converted weights, for concurrent requests of different lengths;
the perplexity of a fixed paragraph scored through the pipeline (`echo` + `logprobs=0`)
equals the single-process figure within 1e-4 relative. (The sanity prompts, a smoke test of
the whole path, are in test_serve.)"""

from __future__ import annotations

import math
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
PARAGRAPH = (
    "The river rises in the hills to the north of the town and flows south through a wide "
    "valley of farms and small villages. In spring the water runs high and fast with melted "
    "snow; by late summer it is shallow enough to cross on foot in several places. For "
    "centuries the mills along its banks ground the grain of the whole region."
)


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


@pytest.fixture(scope="module")
def reference_scores(smollm2_dir: Path, tokenizer: Any) -> tuple[list[float], float]:
    """Single process: log P(token i | tokens < i) over the paragraph, and the log-probability
    of the greedy next token."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.encode(PARAGRAPH)])
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)  # [n, vocab]
    prompt = logprobs[:-1].gather(1, ids[0, 1:, None])[:, 0].tolist()
    return prompt, float(logprobs[-1].max())


def perplexity(scores: list[float]) -> float:
    return math.exp(-sum(scores) / len(scores))


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


def score_paragraph(pipeline: pipelines.Pipeline) -> dict[str, Any]:
    body = {"model": NAME, "prompt": PARAGRAPH, "max_tokens": 1, "temperature": 0}
    body.update(echo=True, logprobs=0)
    status, reply = pipelines.http_json(f"{pipeline.base_url}/v1/completions", body)
    assert status == 200, reply
    return dict(reply["choices"][0])


@stage_counts
def test_greedy_tokens_equal_single_process_generate(
    stages: int,
    smollm2_dir: Path,
    start_pipeline,
    references: list[list[int]],
    reference_scores: tuple[list[float], float],
    tokenizer: Any,
) -> None:
    pipeline = start_pipeline(smollm2_dir, stages=stages, name=NAME, max_context=512)
    try:
        jobs = [("completion", p, n) for p, n in COMPLETIONS]
        jobs += [("chat", c, n) for c, n in CHATS]
        with ThreadPoolExecutor(len(jobs)) as pool:
            got = list(pool.map(lambda job: request(pipeline, *job), jobs))
        assert got == references
        # perplexity through the pipeline, prefill logits from the last stage
        choice = score_paragraph(pipeline)
        n = len(tokenizer.encode(PARAGRAPH))
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == n + 1
        assert logprobs["token_logprobs"][0] is None
        assert choice["text"].startswith(PARAGRAPH)
        prompt_scores, next_score = reference_scores
        ours = perplexity(logprobs["token_logprobs"][1:n])
        theirs = perplexity(prompt_scores)
        assert abs(ours - theirs) <= 1e-4 * theirs, (ours, theirs)
        assert logprobs["token_logprobs"][n] == pytest.approx(next_score, rel=1e-4, abs=1e-5)
        assert pipeline.wait_no_cache() == {i: [] for i in range(stages)}
    finally:
        pipeline.stop()
