"""Chunked, pipelined prefill: stage 0 cuts a long prompt into chunk steps.

Without chunks a prompt's first pass is one step per stage: stage k+1 waits for all of
stage k's work and for the whole prompt's hidden states to cross the link, so the time to
first token is the sum of every stage's prefill and every hop. With chunks of `c` tokens,
stage 0 sends chunk i+1 as soon as it has computed it, while stage 1 runs chunk i: the
stages work on the same prompt at once and the links carry small messages back to back.
Each chunk attends to the chunks before it through the stage's KV cache, so the result is
exact. Every chunk but the last is `partial`: the last stage samples nothing for it.

Chunks share each micro-batch with the other sequences' decode steps under a token budget
(`TokenBudget`): at most `chunk` prompt tokens per micro-batch, however many prompts are
prefilling, while every decode step goes (one token each). A long prompt therefore cannot
hold up running streams for more than one chunk's compute per micro-batch, and it is not
starved either: it re-enters the ready queue after each chunk, behind the decode steps that
were waiting. The chunk size comes from the cost model (`docs/planning.md`, chunked
prefill); 0 turns chunking off (one step per prompt, as before).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TokenBudget:
    """Prompt tokens one micro-batch may still carry (None: no bound, chunking off)."""

    chunk: int
    """Tokens per chunk; 0: whole prompts in one step."""
    left: int = 0

    def __post_init__(self) -> None:
        if self.chunk < 0:
            raise ValueError(f"prefill chunk must be >= 0 tokens, got {self.chunk}")
        self.left = self.chunk

    def take(self, remaining: int) -> int:
        """Tokens of a prompt with `remaining` unsent tokens to send in this micro-batch
        (0: none, wait for the next one)."""
        if self.chunk == 0:
            return remaining
        n = min(remaining, self.left)
        self.left -= n
        return n


def chunkable(prompt_scored: bool) -> bool:
    """Whether a prompt may be cut: the last stage scores an `echo` prompt in one piece
    (it needs every prompt position's hidden state in one step)."""
    return not prompt_scored
