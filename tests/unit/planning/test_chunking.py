"""The prefill chunk size (planning.chunking) against numbers worked out by hand: TTFT(c)
of a two-stage chain, the prompt whole as the c = P case, the choice (the fastest
candidate, none for one stage), and the plan carrying the choice."""

from __future__ import annotations

import pytest

from llmpipe_operator.planning import chunking, cost, planner

from .builders import a_cluster
from .test_cost import CLOUD, EDGE, PROFILE

OVERHEAD = chunking.MESSAGE_OVERHEAD_S
WORKLOAD = cost.Workload(
    max_sequences=4, max_context_tokens=4000, prompt_tokens=1000, runtime_overhead_bytes=0
)


def chain() -> cost.ChainCost:
    return cost.evaluate(
        PROFILE, a_cluster(EDGE, CLOUD).build(), WORKLOAD, nodes=["a", "b"], bounds=[0, 1, 2]
    )


def ttft(chunk: int) -> float:
    cluster = a_cluster(EDGE, CLOUD).build()
    return chunking.first_token_seconds(PROFILE, cluster, WORKLOAD, chain(), chunk=chunk)


def test_chunked_first_token_by_hand() -> None:
    # chunks of 100 tokens, 10 of them:
    # stage 0: max(1.5e9 B / 100 GB/s = 15 ms, 2 x 0.75e9 x 100 / 1 TFLOP/s = 150 ms) + 2 ms
    # stage 1 (layer 1 + head): max(1.5e9 / 1000 GB/s, 2 x 0.75e9 x 100 / 10 TFLOP/s) + 2 ms
    # link a -> b: 8 x 100 x 1000 x 2 / 100e6 = 16 ms, hop 15 ms; token back 3.2e-7 + 15 ms
    first = (0.150 + OVERHEAD) + (0.015 + OVERHEAD) + 0.016 + 0.015
    assert ttft(100) == pytest.approx(first + 9 * (0.150 + OVERHEAD) + 3.2e-7 + 0.015)


def test_the_whole_prompt_is_cost_model_v2_plus_one_message_per_stage() -> None:
    assert ttft(1000) == pytest.approx(chain().time_to_first_token_seconds + 2 * OVERHEAD)
    assert ttft(5000) == ttft(1000)  # a chunk past the prompt is the prompt


def test_choice_is_the_fastest_candidate_and_none_for_one_stage() -> None:
    cluster = a_cluster(EDGE, CLOUD).build()
    choice = chunking.choose(PROFILE, cluster, WORKLOAD, chain())
    sizes = chunking.candidates(WORKLOAD.prompt)
    assert sizes == [16, 32, 64, 128, 256, 512, 1000]
    assert choice.chunk_tokens in sizes[:-1]
    assert choice.time_to_first_token_seconds == min(ttft(c) for c in sizes)
    assert choice.time_to_first_token_seconds < choice.whole_prompt_seconds == ttft(1000)
    alone = cost.evaluate(PROFILE, cluster, WORKLOAD, nodes=["b"], bounds=[0, 2])
    assert chunking.choose(PROFILE, cluster, WORKLOAD, alone).chunk_tokens == 0


def test_the_plan_carries_the_choice() -> None:
    cluster = a_cluster(EDGE, CLOUD).build()
    plan = planner.plan_pipeline(PROFILE, cluster, workload=WORKLOAD)
    data = plan.to_dict()
    if len(plan.stages) > 1:
        assert data["prefillChunkTokens"] > 0
        assert (
            data["estChunkedTimeToFirstTokenSeconds"] < plan.unchunked_time_to_first_token_seconds
        )
    else:
        assert data["prefillChunkTokens"] == 0
    assert planner.Plan.from_dict(data).prefill_chunk_tokens == data["prefillChunkTokens"]
