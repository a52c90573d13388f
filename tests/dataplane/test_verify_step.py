"""The verify step of speculative decoding in the runtime (one process, the real slice and
slot cache): a draft of k = 1..8 tokens that is the model's own continuation is accepted
whole (k + 1 tokens back), a draft that is wrong from its first token is rejected whole
(the one corrected token back), a draft wrong half-way is cut there; after each the cache
is rolled back (the last stage at once, a `rollback` step elsewhere) and decoding goes on
equal to `generate`. Drafts are forced here; the drafter's own are in test_speculation."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmpipe_stage import runtime, wire
from tests.dataplane import pipelines
from tests.dataplane.test_decode_step import whole

PROMPT = [5, 17, 40, 99, 12, 7, 230]
NEW = 24


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pipelines.write_family(tmp_path_factory.mktemp("llama"), "llama-gqa")


@pytest.fixture(scope="module")
def expected(llama_dir: Path) -> list[int]:
    return pipelines.reference_tokens(llama_dir, [PROMPT], [NEW])[0]


def wrong(token: int) -> int:
    return (token + 1) % 256


def decode(
    stage: runtime.StageRuntime, drafts: list[str], k: int, reference: list[int]
) -> list[int]:
    """Generate NEW tokens of PROMPT, each step verifying a forced draft: `full` (the
    model's own continuation), `none` (wrong from the first token) or `half`; the draft
    comes from the reference, the verification from the runtime."""
    sid = 1
    steps = [wire.Step(sid, 0, len(PROMPT))]
    got = stage.sample(steps, stage.run(steps, stage.embed(PROMPT)))
    rollback = False
    turn = 0
    while len(got) < NEW:
        room = min(k, NEW - len(got) - 1)
        kind = drafts[turn % len(drafts)]
        turn += 1
        truth = reference[len(got) : len(got) + room]
        draft = list(truth)
        if kind == "none" and draft:
            draft[0] = wrong(draft[0])
        if kind == "half" and len(draft) > 1:
            draft[len(draft) // 2] = wrong(draft[len(draft) // 2])
        position = len(PROMPT) + len(got) - 1
        step = wire.Step(sid, position, 1 + len(draft), draft=tuple(draft), rollback=rollback)
        sampled = stage.sample_scored([step], stage.run([step], stage.embed([got[-1], *draft])))
        (tokens,) = sampled.per_sequence()
        accepted = len(tokens) - 1
        if kind == "full":
            assert accepted == len(draft)
        elif kind == "none" and draft:
            assert accepted == 0
        elif kind == "half" and len(draft) > 1:
            assert accepted == len(draft) // 2
        # the last stage rolled itself back: it holds the accepted tokens only
        assert stage.caches[sid].length == position + 1 + accepted
        got.extend(tokens)
        rollback = accepted < len(draft)
    stage.release([sid])
    return got


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("drafts", [["full"], ["none"], ["half", "full", "none"]])
def test_forced_drafts_give_generates_tokens(
    llama_dir: Path, expected: list[int], k: int, drafts: list[str]
) -> None:
    stage = whole(llama_dir, max_sequences=2)
    assert decode(stage, drafts, k, expected) == expected


def test_a_rollback_step_continues_a_longer_cache(llama_dir: Path, expected: list[int]) -> None:
    """A stage that is not the last keeps the rejected positions until the next step says
    `rollback`; that step then runs over the accepted ones only."""
    stage = whole(llama_dir, max_sequences=1)
    sid = 3
    steps = [wire.Step(sid, 0, len(PROMPT))]
    first = stage.sample(steps, stage.run(steps, stage.embed(PROMPT)))[0]
    # as a middle stage would: run a 4-token draft, all wrong, without sampling
    draft = [wrong(t) for t in expected[1:5]]
    stage.run([wire.Step(sid, len(PROMPT), 5)], stage.embed([first, *draft]))
    assert stage.caches[sid].length == len(PROMPT) + 5
    # the corrected token is expected[1]; the next step rolls back to after `first`
    step = wire.Step(sid, len(PROMPT) + 1, 1, rollback=True)
    with pytest.raises(runtime.StepError):
        stage.run([wire.Step(sid, len(PROMPT) + 1, 1)], stage.embed([expected[1]]))
    token = stage.sample([step], stage.run([step], stage.embed([expected[1]])))
    assert token == [expected[2]]
