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
NGRAM_MAX tokens, at least NGRAM_MIN once its drafts have been poor) that occurred earlier
in its prompt or output, and the tokens that followed it there. No model, nothing to load;
it proposes nothing where the text does not repeat, and then the step is a plain decode
step. It shines where the answer copies its input: code edits, summaries, answers quoting
a document.

`AdaptiveDraft` picks k per sequence from its acceptance so far: a moving average `a` of
the accepted fraction sets k near the expected run of accepted tokens a / (1 - a) (plus
one), between 1 and the configured maximum. A verify step costs more than a plain one
(k + 1 positions through every stage instead of one), so drafts that are mostly rejected
make decoding slower than no speculation: whenever `a` is below LOW_ACCEPTANCE after a
step, the sequence stops drafting for a while, doubling each time up to BACKOFF_MAX steps,
and probes with one draft after each pause; only a probe that lifts `a` back above the
bound resets the pause (a lone accepted token in a poor run does not), so text whose
drafts are rejected pays for a few probes, not for a draft every other step. Speculation applies to
requests without log-probabilities (a draft's tokens come back unscored).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

NGRAM_MAX = 3
"""Longest suffix looked up; longer matches predict better but occur less."""
NGRAM_MIN = 2
"""Shortest suffix that makes a draft once a sequence's drafts have been poor
(`AdaptiveDraft.min_match`): a one-token match is weak evidence in prose (common tokens
such as " the" or "," recur everywhere and what followed them once is mostly rejected),
while text that is copied (code edits, quotes) repeats in runs of two or more."""
TRUSTED = 0.5
"""Moving acceptance from which a one-token match may draft too (the initial value: a
sequence starts trusting its drafts)."""
SPECULATIONS = ("auto", "off", "ngram", "draft")  # the same as config.SPECULATIONS
DEFAULT_MAX_DRAFT = 8
LOOKBACK = 4096
"""Context tokens searched for a match (bounds the per-step cost on long contexts)."""
BACKOFF_MAX = 64
"""Most decode steps a sequence goes without drafting after rejections."""
LOW_ACCEPTANCE = 0.3
"""Below this moving acceptance a sequence pauses drafting: from the initial 0.5, two
drafts rejected whole (0.5 -> 0.35 -> 0.245) are enough."""


def propose(
    context: list[int], k: int, *, ngram_max: int = NGRAM_MAX, ngram_min: int = NGRAM_MIN
) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the context's longest
    repeated suffix (of ngram_min to ngram_max tokens); [] when nothing repeats."""
    if k < 1 or len(context) < 2:
        return []
    window = context[-LOOKBACK:]
    end = len(window)
    for n in range(min(ngram_max, end - 1), max(ngram_min, 1) - 1, -1):
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

    def min_match(self) -> int:
        """The shortest suffix match worth drafting from: one token while drafts have been
        accepted, NGRAM_MIN once they have not."""
        return 1 if self.acceptance >= TRUSTED else NGRAM_MIN

    def k(self) -> int:
        """Tokens to draft for the next step (0: decode plainly this time)."""
        if self.pause > 0:
            self.pause -= 1
            return 0
        a = min(self.acceptance, 0.95)
        return max(1, min(self.max_k, math.ceil(a / (1 - a)) + 1))

    def update(self, drafted: int, accepted: int) -> None:
        """A verified draft of `drafted` tokens kept `accepted` of them."""
        if drafted <= 0:
            return
        self.acceptance = 0.7 * self.acceptance + 0.3 * (accepted / drafted)
        if self.acceptance < LOW_ACCEPTANCE:
            self.pause = self.backoff
            self.backoff = min(BACKOFF_MAX, 2 * self.backoff)
        else:
            self.backoff = 1
