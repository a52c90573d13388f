"""The draft-model drafter (`--speculate draft`, `llmpipe_stage.draft`) through real stage
processes: greedy tokens equal single-process `generate` for draft bounds k = 1..8 over 1-4
stages. A draft that is the model itself has its drafts accepted (all but near-ties of
float rounding); a different random model of the same vocabulary has many rejected, so
every stage's rollback and the draft model's own cache rollback run. In process: the draft
model's proposals equal what the draft model alone generates greedily after the accepted
prefix, whatever was rejected before (its cache is rolled back, not stale). A draft model
of another vocabulary is refused at load with a message that says so; every cache
(the draft model's too) is freed afterwards."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest
import torch

from llmpipe_stage import demo
from llmpipe_stage.draft import DraftModel, DraftModelError
from tests.dataplane import pipelines
from tests.dataplane.test_speculation import MAX_NEW, PROMPTS, counters


@pytest.fixture(scope="module")
def references(model_dirs: dict[str, Path]) -> dict[str, list[list[int]]]:
    return {
        name: pipelines.reference_tokens(path, PROMPTS, MAX_NEW)
        for name, path in model_dirs.items()
    }


@pytest.fixture(scope="module")
def other_drafts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per family, a smaller random model of the same family and vocabulary (the family
    matters: transformers loads a qwen2 directory's tokenizer as Qwen2's, which splits
    text differently from the same tokenizer.json under a llama directory)."""
    root = tmp_path_factory.mktemp("other-drafts")
    return {
        name: demo.write_model(
            root / name,
            family=spec["family"],
            seed=77,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            initializer_range=0.3,
        )
        for name, spec in pipelines.FAMILIES.items()
    }


@pytest.mark.parametrize(
    ("family", "stages", "max_draft", "draft"),
    [
        ("llama-gqa", 1, 1, "other"),
        ("llama-gqa", 2, 2, "same"),
        ("qwen2-tied", 3, 3, "other"),
        ("llama-gqa", 4, 4, "same"),
        ("qwen2-tied", 1, 5, "same"),
        ("llama-gqa", 2, 6, "other"),
        ("qwen2-tied", 4, 7, "other"),
        ("qwen2-tied", 2, 8, "same"),
    ],
)
def test_draft_model_greedy_tokens_equal_single_process_generate(
    family: str,
    stages: int,
    max_draft: int,
    draft: str,
    model_dirs: dict[str, Path],
    other_drafts: dict[str, Path],
    start_pipeline,
    references: dict[str, list[list[int]]],
) -> None:
    draft_dir = model_dirs[family] if draft == "same" else other_drafts[family]
    pipeline = start_pipeline(
        model_dirs[family],
        stages=stages,
        workload={"speculation": "draft", "maxDraftTokens": max_draft, "prefillChunkTokens": 8},
        extra_args=("--draft-model-dir", str(draft_dir)),
    )
    try:
        got = pipelines.complete_concurrently(pipeline, PROMPTS, MAX_NEW)
        assert got == references[family]
        for prompt, n, expected in zip(PROMPTS, MAX_NEW, references[family], strict=True):
            assert pipelines.complete(pipeline, prompt, n) == expected
        drafted, accepted = counters(pipeline)
        assert drafted > 0
        if draft == "same":
            assert accepted >= 0.95 * drafted, (drafted, accepted)
        else:
            assert accepted < 0.8 * drafted, (drafted, accepted)
        assert pipeline.wait_no_cache() == {i: [] for i in range(stages)}
    finally:
        pipeline.stop()


def _alone(model_dir: Path, context: list[int], n: int) -> list[int]:
    """The draft model's own greedy continuation (transformers, no cache reuse)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = model.generate(
        torch.tensor([context]), max_new_tokens=n, do_sample=False, min_new_tokens=n
    )
    return [int(t) for t in out[0, len(context) :]]


def test_draft_cache_rolls_back_to_the_accepted_prefix(other_drafts: dict[str, Path]) -> None:
    """Proposals after a partly rejected draft are the draft model's greedy tokens after
    the accepted prefix plus the corrected token: the rejected positions left its cache."""
    other_draft = other_drafts["llama-gqa"]
    model = DraftModel.load(
        other_draft,
        target_dir=other_draft,
        dtype=torch.float32,
        device=torch.device("cpu"),
        context_limit=128,
        max_sequences=2,
    )
    context = [5, 6, 7, 8, 9, 10, 11]
    for k in range(1, 9):
        first = model.propose(1, context, k)
        assert first == _alone(other_draft, context, k)
        # keep half the draft, then a token the draft did not propose
        kept = first[: k // 2]
        corrected = (first[len(kept)] + 1) % 50 + 3 if len(kept) < k else 4
        context = [*context, *kept, corrected]
        assert model.propose(1, context, 3) == _alone(other_draft, context, 3)
    model.release([1])
    assert model.runtime.caches == {} and model.cached == {}


def test_a_draft_model_of_another_vocabulary_is_refused(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    vocab = len(demo.build_tokenizer())
    wrong = demo.write_model(tmp_path / "wrong", seed=3, vocab_size=vocab + 8, num_hidden_layers=1)
    with pytest.raises(DraftModelError, match=r"vocabulary has \d+ tokens but the model's has"):
        DraftModel.load(
            wrong,
            target_dir=model_dirs["llama-gqa"],
            dtype=torch.float32,
            device=torch.device("cpu"),
            context_limit=64,
            max_sequences=1,
        )


def test_a_pipeline_with_a_mismatched_draft_model_fails_to_start_and_says_why(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    vocab = len(demo.build_tokenizer())
    wrong = demo.write_model(tmp_path / "wrong", seed=3, vocab_size=vocab + 8, num_hidden_layers=1)
    with pytest.raises(RuntimeError) as failure:
        pipelines.Pipeline.start(
            model_dirs["llama-gqa"],
            tmp_path / "run",
            stages=1,
            workload={"speculation": "draft"},
            extra_args=("--draft-model-dir", str(wrong)),
            ready_timeout=60,
        ).stop()
    assert "a draft model needs the same tokenizer" in str(failure.value)


def truncated_copy(model_dir: Path, path: Path, layers: int) -> Path:
    """The model's first `layers` decoder layers as a draft model: its config with fewer
    layers beside links to its own files (a stage reads only the tensors it needs)."""
    path.mkdir(parents=True)
    for item in model_dir.iterdir():
        if item.name != "config.json":
            (path / item.name).symlink_to(item.resolve())
    config = json.loads((model_dir / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_real_model_with_a_truncated_copy_of_itself_as_draft(
    smollm2_dir: Path, start_pipeline, tmp_path: Path
) -> None:
    """SmolLM2 over 2 stages, its first 24 of 30 layers as the draft: the greedy tokens
    are the model's own, and some drafts are accepted, some rejected. (A truncated copy
    is a test of the mechanism, not a fast draft: it costs 24/30 of the model, and with 10
    or 20 layers its argmax agrees with the model's on 0 or 3 of these 32 tokens.)"""
    from transformers import AutoTokenizer

    from tests.dataplane.test_real_model import NAME
    from tests.dataplane.test_speculation import CODE

    draft_dir = truncated_copy(smollm2_dir, tmp_path / "draft", 24)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    text = f"Rename width to w in this code:\n{CODE}\nThe code with width renamed to w:\n"
    prompt = tokenizer.encode(text)
    expected = pipelines.reference_tokens(smollm2_dir, [prompt], [32])[0]
    pipeline = start_pipeline(
        smollm2_dir,
        stages=2,
        name=NAME,
        max_context=512,
        workload={"speculation": "draft", "maxDraftTokens": 4},
        extra_args=("--draft-model-dir", str(draft_dir)),
    )
    try:
        status, body = pipelines.http_json(
            f"{pipeline.base_url}/v1/completions",
            {
                "model": NAME,
                "prompt": prompt,
                "max_tokens": 32,
                "temperature": 0,
                "return_token_ids": True,
            },
        )
        assert status == 200, body
        assert body["choices"][0]["token_ids"] == expected
        drafted, accepted = counters(pipeline)
        print(f"SmolLM2, 24-layer draft: {accepted:g} of {drafted:g} draft tokens accepted")
        assert 0 < accepted < drafted
        assert pipeline.wait_no_cache() == {i: [] for i in range(2)}
    finally:
        pipeline.stop()


def test_serve_speculates_with_a_draft_model(tmp_path: Path) -> None:
    """`llmpipe serve --speculate draft --draft-model PATH` end to end: the demo model is
    its own draft over 2 stages, the greedy tokens are plain decoding's, and nearly every
    draft token is accepted."""
    cache = tmp_path / "cache"
    model_dir = demo.ensure_demo_model(cache)
    prompt = [5, 6, 7, 8, 9] * 4
    expected = pipelines.reference_tokens(model_dir, [prompt], [20])[0]
    http_port, grpc_port = pipelines.free_port_blocks(2, 2)
    args = ["--model", "demo", "--stages", "2", "--port", str(http_port), "--threads", "1"]
    args += ["--grpc-port", str(grpc_port), "--run-dir", str(tmp_path / "run")]
    args += ["--dtype", "float32", "--speculate", "draft", "--draft-model", str(model_dir)]
    with pipelines.serving(args, timeout=180, cache=cache) as served:
        assert pipelines.READY_LINE in served.output, served.output
        status, body = pipelines.http_json(
            f"http://127.0.0.1:{http_port}/v1/completions",
            {
                "model": demo.DEMO_NAME,
                "prompt": prompt,
                "max_tokens": 20,
                "temperature": 0,
                "return_token_ids": True,
            },
        )
        assert status == 200, body
        assert body["choices"][0]["token_ids"] == expected
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10)
        text = metrics.read().decode()
        drafted = float(re.findall(r"^llmpipe_draft_tokens_total (\S+)$", text, re.M)[0])
        accepted = float(re.findall(r"^llmpipe_accepted_draft_tokens_total (\S+)$", text, re.M)[0])
        assert drafted > 0 and accepted >= 0.95 * drafted, (drafted, accepted)
    assert served.exit_code == 0
