"""Cost model v2 against numbers worked out by hand: memory, compute (memory- and
FLOP-bound) plus the KV cache read at the average context, activation and token-id
transfers, hops, link overrides, tier RTT defaults, a single stage paying no transfer or
hop, and the time to first token (prefill, the prompt's hops, the first token back)."""

from __future__ import annotations

import pytest

from llmpipe_operator.planning import cost, profiles

from .builders import a_cluster, a_node

PROFILE = profiles.ModelProfile(
    name="hand",
    num_layers=2,
    hidden_size=1000,
    layer_bytes=(1_000_000_000, 1_000_000_000),
    embed_bytes=500_000_000,
    head_bytes=500_000_000,
    kv_bytes_per_token_per_layer=1000,
    activation_bytes=2,
    weight_bytes_per_param=2,
)
EDGE = a_node("a").edge().memory("10Gi").tflops(1).bandwidth(100).uplink(100)
CLOUD = a_node("b").cloud().memory("10Gi").tflops(10).bandwidth(1000).uplink(1000)
WORKLOAD = cost.Workload(max_sequences=4, max_context_tokens=100, runtime_overhead_bytes=0)


def test_two_stages_by_hand() -> None:
    costed = cost.evaluate(
        PROFILE, a_cluster(EDGE, CLOUD).build(), WORKLOAD, nodes=["a", "b"], bounds=[0, 1, 2]
    )
    first, last = costed.stages
    assert first.weight_bytes == 1_500_000_000  # layer 0 + embeddings
    assert first.memory_bytes == 1_500_000_000 + 4 * 100 * 1000  # + S*C*kv*1 layer
    # 1.5e9 B / 100 GB/s, + KV read: 4 sequences x C/2 = 50 tokens x 1000 B x 1 layer / 100 GB/s
    assert first.compute_batch == pytest.approx(0.015 + 2e-6)
    assert first.compute_single == pytest.approx(0.015 + 0.5e-6)
    assert first.transfer_batch == pytest.approx(8 * 4 * 1000 * 2 / 100e6)  # min uplink 100
    assert first.transfer_single == pytest.approx(8 * 1 * 1000 * 2 / 100e6)
    assert first.hop == pytest.approx(0.015)  # edge-cloud default 30 ms / 2
    assert last.compute_batch == pytest.approx(0.0015 + 2e-7)  # KV: 2e5 B / 1000 GB/s
    assert last.transfer_batch == pytest.approx(8 * 4 * 4 / 100e6)  # token ids back to 0
    assert last.hop == pytest.approx(0.015)
    assert costed.bottleneck_seconds == pytest.approx(0.015 + 2e-6)
    assert costed.token_latency_seconds == pytest.approx(
        0.015 + 0.5e-6 + 0.00016 + 0.015 + 0.0015 + 0.5e-7 + 3.2e-7 + 0.015
    )


def test_kv_cache_reads_at_the_average_context() -> None:
    # 8 sequences at an average context of 2,048 tokens read 8 x 2048 x 1000 B = 16.4 MB of
    # KV cache per layer and step: layer 1 alone (1e9 B of weights at 1000 GB/s = 1 ms)
    # gains 16.4 us, whatever the FLOP rate
    workload = cost.Workload(
        max_sequences=8,
        max_context_tokens=4096,
        average_context_tokens=2048,
        runtime_overhead_bytes=0,
    )
    costed = cost.evaluate(
        PROFILE, a_cluster(EDGE, CLOUD).build(), workload, nodes=["a", "b"], bounds=[0, 1, 2]
    )
    last = costed.stages[1]
    assert last.compute_batch == pytest.approx(0.0015 + 8 * 2048 * 1000 / 1000e9)
    assert last.compute_single == pytest.approx(0.0015 + 2048 * 1000 / 1000e9)
    assert cost.Workload(max_context_tokens=2048).average_context == 1024


def test_time_to_first_token_by_hand() -> None:
    workload = cost.Workload(
        max_sequences=4, max_context_tokens=4000, prompt_tokens=1000, runtime_overhead_bytes=0
    )
    costed = cost.evaluate(
        PROFILE, a_cluster(EDGE, CLOUD).build(), workload, nodes=["a", "b"], bounds=[0, 1, 2]
    )
    # stage 0: 2 x 0.75e9 params x 1000 tokens / 1 TFLOP/s = 1.5 s (FLOP-bound)
    # stage 1: 2 x 0.75e9 x 1000 / 10 TFLOP/s = 0.15 s
    # the prompt's hidden states a -> b: 8 x 1000 x 1000 x 2 / 100e6 = 0.16 s, + 15 ms hop
    # the first token b -> a: 8 x 4 / 100e6, + 15 ms hop
    assert costed.time_to_first_token_seconds == pytest.approx(
        1.5 + 0.15 + 0.16 + 0.015 + 3.2e-7 + 0.015
    )


def test_compute_bound_at_a_large_batch() -> None:
    workload = cost.Workload(max_sequences=64, max_context_tokens=1, runtime_overhead_bytes=0)
    costed = cost.evaluate(
        PROFILE, a_cluster(EDGE, CLOUD).build(), workload, nodes=["a", "b"], bounds=[0, 1, 2]
    )
    # 2 FLOPs x 0.75e9 params x 64 tokens / 1 TFLOP/s beats 1.5e9 B / 100 GB/s; the KV
    # read (a context of 1 token) adds 64 x 1000 B / 100 GB/s
    assert costed.stages[0].compute_batch == pytest.approx(0.096 + 6.4e-7)
    assert costed.stages[0].compute_single == pytest.approx(0.015 + 1e-8)


def test_one_stage_pays_no_transfer_and_no_hop() -> None:
    costed = cost.evaluate(
        PROFILE, a_cluster(EDGE, CLOUD).build(), WORKLOAD, nodes=["b"], bounds=[0, 2]
    )
    (stage,) = costed.stages
    assert stage.has_embedding and stage.has_head
    assert (stage.transfer_batch, stage.transfer_single, stage.hop) == (0, 0, 0)
    kv = 1000 * 50 * 2 / 1000e9  # C/2 = 50 tokens x 1000 B x 2 layers, per sequence
    assert costed.bottleneck_seconds == pytest.approx(0.003 + 4 * kv)
    assert costed.token_latency_seconds == pytest.approx(0.003 + kv)


def test_a_link_overrides_uplinks_and_tier_rtt() -> None:
    cluster = a_cluster(EDGE, CLOUD).link("b", "a", mbps=10, rtt_ms=100).build()
    costed = cost.evaluate(PROFILE, cluster, WORKLOAD, nodes=["a", "b"], bounds=[0, 1, 2])
    assert costed.stages[0].transfer_batch == pytest.approx(8 * 4 * 1000 * 2 / 10e6)
    assert costed.stages[0].hop == pytest.approx(0.05)
    assert costed.stages[1].hop == pytest.approx(0.05)  # links are symmetric


def test_tier_pair_rtt_defaults_come_from_the_file() -> None:
    other = a_node("c").edge().uplink(1000)
    cluster = a_cluster(EDGE, other, CLOUD).rtt_ms(edge_edge=7, edge_cloud=90).build()
    assert cluster.rtt_ms("a", "c") == 7
    assert cluster.rtt_ms("b", "c") == 90
    assert cluster.rtt_ms("b", "b") == 0.5  # cloud-cloud keeps its default
    assert cluster.mbps("a", "c") == 100


def test_memory_counts_the_kv_cache_of_every_layer_and_the_overhead() -> None:
    workload = cost.Workload(max_sequences=3, max_context_tokens=10, runtime_overhead_bytes=7)
    assert cost.memory_bytes(PROFILE, workload, 0, 2) == 3_000_000_000 + 3 * 10 * 1000 * 2 + 7
    assert cost.memory_bytes(PROFILE, workload, 1, 2) == 1_500_000_000 + 3 * 10 * 1000 + 7


@pytest.mark.parametrize("bounds", [[0, 2, 2], [1, 2], [0, 1], [0, 1, 1, 2]])
def test_bad_chains_are_refused(bounds: list[int]) -> None:
    cluster = a_cluster(EDGE, CLOUD, a_node("c")).build()
    with pytest.raises(ValueError):
        cost.evaluate(
            PROFILE, cluster, WORKLOAD, nodes=["a", "b", "c"][: len(bounds) - 1], bounds=bounds
        )


def test_a_node_holds_one_stage_only() -> None:
    with pytest.raises(ValueError, match="one stage"):
        cost.evaluate(
            PROFILE, a_cluster(EDGE, CLOUD).build(), WORKLOAD, nodes=["a", "a"], bounds=[0, 1, 2]
        )
