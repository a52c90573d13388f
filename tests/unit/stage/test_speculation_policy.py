"""Stage 0's drafting policy (`llmpipe_stage.speculation`): prompt lookup proposes what
followed the latest earlier occurrence of the longest repeated suffix, from a one-token
match only while drafts are trusted; `AdaptiveDraft` sizes k from the acceptance, pauses
after poor drafts with a doubling pause up to the bound, is not reset by a lone accepted
token in a poor run, and drafts every step again once its drafts are accepted.
(Exactness through the pipeline: tests/dataplane/test_speculation.py.)"""

from __future__ import annotations

from llmpipe_stage import speculation
from llmpipe_stage.speculation import AdaptiveDraft


def test_propose_continues_the_latest_longest_match() -> None:
    context = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 4, 1, 2, 3]
    assert speculation.propose(context, 2) == [7, 8]  # the latest "1 2 3"
    assert speculation.propose(context, 10) == [7, 8, 4, 1, 2, 3]
    assert speculation.propose([5, 6, 5, 6], 3) == [5, 6]
    assert speculation.propose([5, 6, 5, 6], 0) == []


def test_a_one_token_match_drafts_only_while_drafts_are_accepted() -> None:
    context = [4, 8, 1, 9, 2, 8]  # only "8" repeats
    assert speculation.propose(context, 3) == []
    assert speculation.propose(context, 3, ngram_min=1) == [1, 9, 2]
    assert speculation.propose([3, 3], 2) == []
    drafter = AdaptiveDraft()
    assert drafter.min_match() == 1  # a sequence starts trusting its drafts
    drafter.update(4, 0)
    assert drafter.min_match() == speculation.NGRAM_MIN
    for _ in range(3):
        drafter.update(4, 4)
    assert drafter.min_match() == 1


def steps_drafting(drafter: AdaptiveDraft, steps: int, accept: float) -> int:
    """Run `steps` decode steps whose drafts keep `accept` of their tokens (rounded down);
    the number of steps that drafted."""
    drafting = 0
    for _ in range(steps):
        k = drafter.k()
        if k == 0:
            continue
        drafting += 1
        drafter.update(k, int(k * accept))
    return drafting


def test_rejected_drafts_pause_drafting_for_longer_and_longer() -> None:
    drafter = AdaptiveDraft(max_k=8)
    drafting = steps_drafting(drafter, 200, accept=0.0)
    # two rejected drafts, then probes after pauses of 1, 2, 4, ... 64 steps
    assert drafting <= 2 + 8
    assert drafter.backoff == speculation.BACKOFF_MAX


def test_a_lone_accepted_token_does_not_reset_the_pause() -> None:
    drafter = AdaptiveDraft(max_k=8)
    steps_drafting(drafter, 40, accept=0.0)
    backoff = drafter.backoff
    while drafter.k() == 0:
        pass
    drafter.update(4, 1)  # one of four: still a poor run
    assert drafter.pause > 0
    assert drafter.backoff >= backoff > 1  # not reset to one


def test_accepted_drafts_draft_every_step_with_a_longer_k() -> None:
    drafter = AdaptiveDraft(max_k=8)
    steps_drafting(drafter, 40, accept=0.0)  # paused for a while
    while drafter.k() == 0:
        pass
    drafter.update(2, 2)
    drafter.update(2, 2)  # a good probe and the next: the bound is passed again
    assert drafter.backoff == 1
    assert steps_drafting(drafter, 20, accept=1.0) == 20
    assert drafter.k() == 8
