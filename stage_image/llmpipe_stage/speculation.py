"""Speculative decoding through the pipeline: stage 0's drafts and how many to send.

A lone sequence leaves every stage but one idle, and each of its tokens costs a full trip
around the ring. Stage 0 (where the text is) guesses the next k tokens; the pipeline runs
the last accepted token and the k guesses as one step of k + 1 positions; the last stage
takes the model's greedy choice at each position, accepts the guesses up to the first that
differs and returns them with the first corrected choice (`runtime.StageRuntime._verify`).
One trip then yields between 1 and k + 1 tokens, and greedy output is exactly what plain
decoding gives: every token returned is the model's own argmax after the tokens before it.
A sampled request's draft is verified by the accept/reject rule of speculative sampling
(`llmpipe_stage.sampling.accept_draft`; prompt lookup's q is a point mass on its token), so
its tokens have exactly the distribution plain sampling gives them.
Every stage drops the rejected positions from its cache: the last stage at once, the
others when the sequence's next step (flagged `rollback`) sets the length back.

The drafter is prompt lookup (`propose`): the longest suffix of the sequence (up to
NGRAM_MAX tokens) that occurred earlier in its prompt or output, and the tokens that
followed it there. No model, nothing to load; it proposes nothing where the text does not
repeat, and then the step is a plain decode step. It shines where the answer copies its
input: code edits, summaries, answers quoting a document.

`AdaptiveDraft` picks k per sequence from its acceptance so far: a moving average `a` of
the accepted fraction sets k near the expected run of accepted tokens a / (1 - a) (plus
one), between 1 and the configured maximum; after a draft rejected whole while `a` is low,
the sequence stops drafting for a while (doubling each time, up to BACKOFF_MAX steps), so
text that does not repeat costs little more than plain decoding. Speculation applies to
requests without log-probabilities (a draft's tokens come back unscored).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

NGRAM_MAX = 3
"""Longest suffix looked up; longer matches predict better but occur less."""
SPECULATIONS = ("off", "ngram")  # the same as config.SPECULATIONS
DEFAULT_MAX_DRAFT = 8
LOOKBACK = 4096
"""Context tokens searched for a match (bounds the per-step cost on long contexts)."""
BACKOFF_MAX = 64
"""Most decode steps a sequence goes without drafting after rejections."""
LOW_ACCEPTANCE = 0.2


def propose(context: list[int], k: int, *, ngram_max: int = NGRAM_MAX) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the context's longest
    repeated suffix (of at most ngram_max tokens); [] when nothing repeats."""
    if k < 1 or len(context) < 2:
        return []
    window = context[-LOOKBACK:]
    end = len(window)
    for n in range(min(ngram_max, end - 1), 0, -1):
        tail = window[end - n :]
        for start in range(end - n - 1, -1, -1):  # latest first, never the suffix itself
            if window[start : start + n] == tail:
                return window[start + n : start + n + k]
    return []


@dataclass
class AdaptiveDraft:
    """One sequence's draft length, from its acceptance so far."""

    max_k: int = DEFAULT_MAX_DRAFT
    acceptance: float = 0.5
    """Moving average of accepted / drafted tokens."""
    pause: int = 0
    """Decode steps left without drafting."""
    backoff: int = 1

    def k(self) -> int:
        """Tokens to draft for the next step (0: decode plainly this time)."""
        if self.pause > 0:
            self.pause -= 1
            return 0
        a = min(self.acceptance, 0.95)
        return max(1, min(self.max_k, math.ceil(a / (1 - a)) + 1))

    def update(self, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        self.acceptance = 0.7 * self.acceptance + 0.3 * (accepted / drafted)
        if accepted == 0 and self.acceptance < LOW_ACCEPTANCE:
            self.pause = self.backoff
            self.backoff = min(BACKOFF_MAX, 2 * self.backoff)
        elif accepted > 0:
            self.backoff = 1
