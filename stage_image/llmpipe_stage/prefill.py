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

The per-micro-batch budget bounds what stage 0 adds, not what piles up further down: a
stage slower than stage 0 would collect chunk after chunk in its queue, and a decode step
arriving behind them waits for all of them. Token throttling bounds the prompt tokens in
flight (sent by stage 0, not yet run by the last stage; the last stage acknowledges each
partial chunk in `Tokens.chunk_sequence_ids`): a chunk goes only while the tokens in
flight plus its own stay within `in_flight_limit`, or when nothing is in flight, so no
queue in the ring ever holds more than that, and a decode step waits for at most that
many tokens' compute at any stage. Decode steps are never throttled.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TokenBudget:
    """Prompt tokens one micro-batch may still carry (None: no bound, chunking off)."""

    chunk: int
    """Tokens per chunk; 0: whole prompts in one step."""
    room: int | None = None
    """Prompt tokens that may still be put in flight (token throttling); None: no bound."""
    idle: bool = False
    """Nothing is in flight: one chunk goes whatever `room` says (a prompt is never
    starved by a bound below one chunk)."""
    throttled: bool = False
    """A take came back 0 because of `room` (not of this micro-batch's budget)."""
    left: int = 0

    def __post_init__(self) -> None:
        if self.chunk < 0:
            raise ValueError(f"prefill chunk must be >= 0 tokens, got {self.chunk}")
        self.left = self.chunk

    def take(self, remaining: int) -> int:
        """Tokens of a prompt with `remaining` unsent tokens to send in this micro-batch
        (0: none, wait for the next one)."""
        self.throttled = False
        if self.chunk == 0:
            return remaining
        n = min(remaining, self.left)
        if self.room is not None and n > 0:
            if n > self.room and not self.idle:
                self.throttled = True
                return 0
            self.room -= n
            self.idle = False
        self.left -= n
        return n


def in_flight_limit(setting: int | None, *, chunk: int, num_stages: int) -> int | None:
    """The bound on prompt tokens in flight: `setting` when given (0: no bound), else two
    chunks per stage (one running on each stage, one crossing each hop, the return hop
    included), the least that keeps every stage of a pipeline of equal stages busy with
    one prompt's chunks. None: no bound (chunking off, or one stage: nothing is in flight
    after stage 0's own step)."""
    if chunk == 0 or num_stages < 2:
        return None
    if setting is None:
        return 2 * num_stages * chunk
    if setting < 0:
        raise ValueError(f"prompt tokens in flight must be >= 0 (0: no bound), got {setting}")
    return setting or None


def chunkable(prompt_scored: bool) -> bool:
    """Whether a prompt may be cut: the last stage scores an `echo` prompt in one piece
    (it needs every prompt position's hidden state in one step)."""
    return not prompt_scored
