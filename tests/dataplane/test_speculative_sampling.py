"""Speculative decoding of sampled requests leaves the output distribution unchanged.

A tiny random Llama with an 8-token vocabulary runs whole in one `StageRuntime` (the real
slice, slot cache and sampler). Each of many seeded samples prefills the prompt, then
generates its next tokens either plainly or through verify steps whose drafts (a fixed
function of the context, so some are accepted and some rejected) go through the last
stage's accept/reject rule; the first three generated tokens' joint frequencies are
compared with their exact probabilities, computed independently from transformers' own
forward pass with the same temperature and top_p, by a chi-square test at a 1e-3 level.
The same test with a deliberately wrong rule in the runtime (accept every draft token;
draw from p instead of the residual after a rejection) fails: the last two tests keep it
so, and the wrong rules were what the bound was chosen against while developing."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmpipe_stage import demo, loading, runtime, sampling, wire
from llmpipe_stage.proto import stage_pb2

VOCAB = 8
PROMPT = [3, 5, 1, 4, 3, 5, 6]
NEW = 3
SAMPLES = 1200
settings = pytest.mark.parametrize(
    ("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.9)], ids=["t1", "t0.7-p0.9"]
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo.write_model(
        tmp_path_factory.mktemp("vocab8"),
        family="llama",
        seed=5,
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        initializer_range=0.2,
    )


@pytest.fixture(scope="module")
def stage(model_dir: Path) -> runtime.StageRuntime:
    piece = loading.build_whole(model_dir, dtype=torch.float32)
    return runtime.StageRuntime(piece, context_limit=64, max_sequences=2)


def exact(model_dir: Path, *, temperature: float, top_p: float) -> Joint:
    """P(first NEW tokens) from transformers' forward pass over every prefix."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prefixes: list[tuple[tuple[int, ...], float]] = [((), 1.0)]
    for _ in range(NEW):
        ids = torch.tensor([[*PROMPT, *prefix] for prefix, _ in prefixes])
        with torch.inference_mode():
            logits = model(ids).logits[:, -1].float()  # [prefixes, vocab]
        grown = []
        for (prefix, weight), row in zip(prefixes, logits, strict=True):
            probs = sampling.probabilities(row, temperature=temperature, top_p=top_p)
            probs = probs / probs.sum()
            grown += [((*prefix, x), weight * float(probs[x])) for x in range(VOCAB)]
        prefixes = grown
    return dict(prefixes)


Joint = dict[tuple[int, ...], float]


def likeliest(probs: Joint) -> dict[tuple[int, ...], int]:
    """For each generated prefix shorter than NEW, its most likely next token."""
    following: dict[tuple[int, ...], Counter[int]] = {}
    for cell, p in probs.items():
        for m in range(NEW):
            following.setdefault(cell[:m], Counter())[cell[m]] += p  # type: ignore[assignment]
    return {prefix: max(nexts, key=nexts.__getitem__) for prefix, nexts in following.items()}


def draft_for(likely: dict[tuple[int, ...], int], got: list[int], k: int) -> list[int]:
    """A draft fixed by the context (independent of the verifier's draws, as the rule
    needs): the likeliest continuation, made wrong at the first token for some contexts,
    so drafts are accepted and rejected."""
    draft: list[int] = []
    for j in range(k):
        token = likely[(*got, *draft)]
        if j == 0 and sum(got) % 3 == 0:
            token = (token + 1) % VOCAB
        draft.append(token)
    return draft


def generate(
    stage: runtime.StageRuntime,
    seed: int,
    *,
    likely: dict[tuple[int, ...], int] | None,
    temperature: float,
    top_p: float,
) -> tuple[tuple[int, ...], int, int]:
    """The first NEW tokens of one seeded sample; with the draft tokens sent and accepted."""
    sid = seed + 1
    sampling_message = stage_pb2.Sampling(
        temperature=temperature, top_p=top_p, has_seed=True, seed=seed
    )
    steps = [wire.Step(sid, 0, len(PROMPT), sampling_message)]
    got = stage.sample(steps, stage.run(steps, stage.embed(PROMPT)))
    drafted = accepted = 0
    while len(got) < NEW:
        position = len(PROMPT) + len(got) - 1
        draft = [] if likely is None else draft_for(likely, got, NEW - len(got))
        step = wire.Step(sid, position, 1 + len(draft), draft=tuple(draft))
        sampled = stage.sample_scored([step], stage.run([step], stage.embed([got[-1], *draft])))
        (tokens,) = sampled.per_sequence()
        drafted += len(draft)
        accepted += len(tokens) - 1
        got.extend(tokens)
    stage.release([sid])
    return tuple(got[:NEW]), drafted, accepted


def chi_square(counts: Counter[tuple[int, ...]], probs: dict[tuple[int, ...], float]) -> float:
    """Pearson's statistic over the cells expected >= 5 times, the rest pooled in one,
    divided by the 1e-3 critical value for its degrees of freedom (Wilson-Hilferty):
    above 1 rejects "same distribution"."""
    n = sum(counts.values())
    big = [cell for cell, p in probs.items() if n * p >= 5]
    cells = [(counts[c], n * probs[c]) for c in big]
    rest = [c for c in probs if c not in set(big)]
    cells.append((sum(counts[c] for c in rest), n * sum(probs[c] for c in rest)))
    stat = sum((o - e) ** 2 / e for o, e in cells if e > 0)
    df = len(cells) - 1
    z = 3.090  # standard normal 1 - 1e-3 quantile
    critical = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return stat / critical


def frequencies(
    stage: runtime.StageRuntime,
    *,
    likely: dict[tuple[int, ...], int] | None,
    temperature: float,
    top_p: float,
    samples: int = SAMPLES,
) -> tuple[Counter[tuple[int, ...]], int, int]:
    """Counts of the first NEW tokens over seeded samples (likely None: no speculation)."""
    counts: Counter[tuple[int, ...]] = Counter()
    drafted = accepted = 0
    for seed in range(samples):
        tokens, d, a = generate(stage, seed, likely=likely, temperature=temperature, top_p=top_p)
        counts[tokens] += 1
        drafted += d
        accepted += a
    return counts, drafted, accepted


@settings
def test_sampled_speculation_keeps_the_distribution(
    model_dir: Path, stage: runtime.StageRuntime, temperature: float, top_p: float
) -> None:
    probs = exact(model_dir, temperature=temperature, top_p=top_p)
    assert max(probs.values()) < 0.5  # a spread distribution, or the test shows nothing
    plain, _, _ = frequencies(stage, likely=None, temperature=temperature, top_p=top_p)
    assert chi_square(plain, probs) < 1  # the sampler itself matches the reference
    counts, drafted, accepted = frequencies(
        stage, likely=likeliest(probs), temperature=temperature, top_p=top_p
    )
    assert 0.1 * drafted < accepted < 0.9 * drafted  # both accepts and rejects ran
    assert chi_square(counts, probs) < 1


def _always_accept(
    probs: torch.Tensor,
    draft: list[int],
    generator: torch.Generator,
    *,
    draft_probs: torch.Tensor | None = None,
) -> list[int]:
    return [*draft, sampling.draw(probs[len(draft)], generator)]


@pytest.mark.parametrize("wrong", ["always accept", "draw from p on rejection"])
def test_a_wrong_rule_fails_the_same_check(
    model_dir: Path, stage: runtime.StageRuntime, monkeypatch: pytest.MonkeyPatch, wrong: str
) -> None:
    if wrong == "always accept":
        monkeypatch.setattr(sampling, "accept_draft", _always_accept)
    else:
        monkeypatch.setattr(sampling, "residual", lambda p, token, q=None: p / p.sum())
    probs = exact(model_dir, temperature=1.0, top_p=1.0)
    counts, _, _ = frequencies(
        stage, likely=likeliest(probs), temperature=1.0, top_p=1.0, samples=1000
    )
    assert chi_square(counts, probs) > 1


def test_a_seed_reproduces_a_sampled_speculative_run(
    model_dir: Path, stage: runtime.StageRuntime
) -> None:
    """The seed stays meaningful with speculation: the same seed, the same tokens."""
    likely = likeliest(exact(model_dir, temperature=1.0, top_p=1.0))
    runs = [generate(stage, 42, likely=likely, temperature=1.0, top_p=1.0) for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]
    seeds = range(20)
    others = {generate(stage, s, likely=likely, temperature=1.0, top_p=1.0)[0] for s in seeds}
    assert len(others) > 1
