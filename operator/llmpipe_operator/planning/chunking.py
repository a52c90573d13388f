"""The prefill chunk size: cost model v2's time to first token of a prompt cut into chunks.

A P-token prompt cut into n = ceil(P / c) chunks of c tokens flows through the stages back
to back (docs/planning.md, "Chunked prefill"). With, for stage s,

    step_s(c)  = compute_s(c) + MESSAGE_OVERHEAD_S        one chunk's compute on stage s
    link_s(c)  = xfer_s(c)                                its hidden states to stage s + 1
    hop_s                                                 half the round trip to stage s + 1

the first chunk reaches the head after L(c) = sum_s (step_s(c) + link_s(c) + hop_s); the
chunks behind it follow one per B(c) = max_s max(step_s(c), link_s(c)), the pipeline's
slowest part; the last chunk's token then goes back to stage 0. So

    TTFT(c) = L(c) + (n - 1) * B(c) + xfer_last(1) + hop_last

c = P is the prompt in one step (n = 1): TTFT(P) is cost model v2's unchunked estimate
plus one message overhead per stage. Small chunks pay the per-message overhead n times
and read every stage's weights n times (compute_s has a floor: reading the weights once);
large chunks leave the stages idle while the first one works. `choose` evaluates powers of
two from MIN_CHUNK up to P and the prompt whole, and takes the fastest (the larger on a tie:
fewer messages). Pure: numbers in, numbers out.
"""

from __future__ import annotations

import dataclasses
import math

from llmpipe_operator.planning import cost, profiles
from llmpipe_operator.planning import inventory as inv

MESSAGE_OVERHEAD_S = 0.002
"""What one more message costs each stage besides its FLOPs and bytes: encoding and
decoding the hidden states, one gRPC call, scheduling (about 2 ms in this runtime on a CPU
core, from the per-step times in docs/benchmarks.md)."""
MIN_CHUNK = 16
"""Smaller chunks never pay: below it every stage is bound by reading its weights."""


@dataclasses.dataclass(frozen=True)
class ChunkChoice:
    chunk_tokens: int
    """Prompt tokens per chunk; 0: the prompt in one step (chunking does not help)."""
    time_to_first_token_seconds: float
    """TTFT(chunk) of the workload's prompt (TTFT(P) when chunk_tokens is 0)."""
    whole_prompt_seconds: float
    """TTFT(P): the same prompt in one step per stage, for comparison."""


def first_token_seconds(
    profile: profiles.ModelProfile,
    inventory: inv.Inventory,
    workload: cost.Workload,
    chain: cost.ChainCost,
    *,
    chunk: int,
) -> float:
    """TTFT(c) above for the workload's prompt P over the costed chain."""
    prompt = workload.prompt
    chunk = max(1, min(chunk, prompt))
    count = len(chain.stages)
    steps, links, hops = [], [], []
    for s, stage in enumerate(chain.stages):
        node = inventory.node(stage.node)
        steps.append(
            cost.compute_seconds(profile, node, stage.weight_bytes, batch=chunk, workload=workload)
            + MESSAGE_OVERHEAD_S
        )
        if s < count - 1:
            mbps = inventory.mbps(stage.node, chain.stages[s + 1].node)
            links.append(cost.activation_seconds(profile, mbps, batch=chunk))
            hops.append(stage.hop)
    first = sum(steps) + sum(links) + sum(hops)
    bottleneck = max(max(steps), max(links, default=0.0))
    back = 0.0
    if count > 1:
        last = chain.stages[-1]
        back = cost.token_ids_seconds(inventory.mbps(last.node, chain.stages[0].node), batch=1)
        back += last.hop
    return first + (math.ceil(prompt / chunk) - 1) * bottleneck + back


def candidates(prompt: int) -> list[int]:
    """Powers of two from MIN_CHUNK below the prompt, then the prompt itself."""
    sizes, size = [], MIN_CHUNK
    while size < prompt:
        sizes.append(size)
        size *= 2
    return [*sizes, prompt]


def choose(
    profile: profiles.ModelProfile,
    inventory: inv.Inventory,
    workload: cost.Workload,
    chain: cost.ChainCost,
) -> ChunkChoice:
    """The chunk size with the lowest TTFT(c) for the workload's prompt."""
    prompt = workload.prompt
    timed = [
        (first_token_seconds(profile, inventory, workload, chain, chunk=c), c)
        for c in candidates(prompt)
    ]
    whole = timed[-1][0]
    best_seconds, best = min(timed, key=lambda pair: (pair[0], -pair[1]))
    if best >= prompt or len(chain.stages) == 1:  # one stage has nothing to overlap
        return ChunkChoice(0, whole, whole)
    return ChunkChoice(best, best_seconds, whole)
