"""Cost model v2 against numbers worked out by hand: memory, compute (memory- and
FLOP-bound) plus the KV cache read at the average context, activation and token-id
transfers, hops, link overrides, tier RTT defaults, a single stage paying no transfer or
hop, and the time to first token (prefill, the prompt's hops, the first token back); the
round of K micro-batches of S / K tokens; the fixed costs (per layer, per token and
layer, per step, per message hop), their defaults from the compute figure, and the
measured product curve (made monotone, interpolated, used on CPU stages only)."""

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
EDGE = a_node("a").edge().memory("10Gi").tflops(1).bandwidth(100).uplink(100).no_fixed_costs()
CLOUD = a_node("b").cloud().memory("10Gi").tflops(10).bandwidth(1000).uplink(1000).no_fixed_costs()
WORKLOAD = cost.Workload(max_sequences=4, max_context_tokens=100, runtime_overhead_bytes=0)


def test_two_stages_by_hand() -> None:
    costed = cost.evaluate(
        PROFILE, a_cluster(EDGE, CLOUD).build(), WORKLOAD, nodes=["a", "b"], bounds=[0, 1, 2]
    )
    first, last = costed.stages
    assert first.weight_bytes == 1_500_000_000  # layer 0 + embeddings
    assert first.memory_bytes == 1_500_000_000 + 4 * 100 * 1000  # + S*C*kv*1 layer
    # two stages: K = 2 micro-batches of b = S / 2 = 2 sequences each
    # 1.5e9 B / 100 GB/s, + KV read: 2 sequences x C/2 = 50 tokens x 1000 B x 1 layer / 100 GB/s
    assert first.compute_batch == pytest.approx(0.015 + 1e-6)
    assert first.compute_single == pytest.approx(0.015 + 0.5e-6)
    assert first.transfer_batch == pytest.approx(8 * 2 * 1000 * 2 / 100e6)  # min uplink 100
    assert first.transfer_single == pytest.approx(8 * 1 * 1000 * 2 / 100e6)
    assert first.hop == pytest.approx(0.015)  # edge-cloud default 30 ms / 2
    assert last.compute_batch == pytest.approx(0.0015 + 1e-7)  # KV: 1e5 B / 1000 GB/s
    assert last.transfer_batch == pytest.approx(8 * 2 * 4 / 100e6)  # token ids back to 0
    assert last.hop == pytest.approx(0.015)
    # a round: each of the 2 micro-batches through the slower stage
    assert costed.bottleneck_seconds == pytest.approx(2 * (0.015 + 1e-6))
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
    assert last.compute_batch == pytest.approx(0.0015 + 4 * 2048 * 1000 / 1000e9)  # b = 8 / 2
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
    # b = 64 / 2: 2 FLOPs x 0.75e9 params x 32 tokens / 1 TFLOP/s beats 1.5e9 B / 100 GB/s;
    # the KV read (a context of 1 token) adds 32 x 1000 B / 100 GB/s
    assert costed.stages[0].compute_batch == pytest.approx(0.048 + 3.2e-7)
    assert costed.bottleneck_seconds == pytest.approx(2 * (0.048 + 3.2e-7))
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
    assert costed.stages[0].transfer_batch == pytest.approx(8 * 2 * 1000 * 2 / 10e6)
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


TIMED = (
    a_node("t").edge().memory("10Gi").tflops(1).bandwidth(100).uplink(100)
    .timings(layer=1e-3, token=1e-5, step=2e-3, hop=4e-3)
)  # fmt: skip


def test_fixed_costs_by_hand() -> None:
    costed = cost.evaluate(
        PROFILE, a_cluster(TIMED, CLOUD).build(), WORKLOAD, nodes=["t", "b"], bounds=[0, 1, 2]
    )
    first, last = costed.stages
    # b = 2: products and KV as in test_two_stages_by_hand, + a + 1 layer x (f + g x 2)
    assert first.compute_batch == pytest.approx(0.015 + 1e-6 + 2e-3 + 1e-3 + 2e-5)
    assert first.compute_single == pytest.approx(0.015 + 0.5e-6 + 2e-3 + 1e-3 + 1e-5)
    assert first.message == pytest.approx(4e-3)
    assert last.message == 0  # CLOUD states no fixed costs
    assert first.busy_batch == pytest.approx(first.compute_batch + 4e-3)
    assert costed.bottleneck_seconds == pytest.approx(2 * first.busy_batch)
    assert costed.token_latency_seconds == pytest.approx(
        first.compute_single + 1.6e-4 + 0.015 + 4e-3 + last.compute_single + 3.2e-7 + 0.015
    )


def test_one_stage_pays_its_fixed_costs_but_no_message() -> None:
    costed = cost.evaluate(PROFILE, a_cluster(TIMED).build(), WORKLOAD, nodes=["t"], bounds=[0, 2])
    (stage,) = costed.stages
    kv = 4 * 50 * 1000 * 2 / 100e9  # b = S = 4 sequences, 2 layers
    assert stage.message == 0
    assert stage.compute_batch == pytest.approx(0.03 + kv + 2e-3 + 2 * (1e-3 + 4e-5))
    assert costed.bottleneck_seconds == pytest.approx(stage.compute_batch)


def test_default_fixed_costs_scale_with_the_cpu_figure() -> None:
    slow, fast = a_node("s").tflops(0.05).build(), a_node("f").tflops(0.5).build()
    assert slow.timings is None
    timings = cost.timings(slow)
    assert timings.layer_seconds == pytest.approx(cost.DEFAULT_LAYER_FLOP / 0.05e12)
    assert timings.hop_seconds == pytest.approx(cost.DEFAULT_HOP_FLOP / 0.05e12)
    assert cost.timings(fast).step_seconds == pytest.approx(timings.step_seconds / 10)
    # a node stating some fixed costs keeps the default for the others
    partial = a_node("p").tflops(0.05)._with(hopSeconds=1e-3).build()
    assert cost.timings(partial).hop_seconds == 1e-3
    assert cost.timings(partial).layer_seconds == pytest.approx(timings.layer_seconds)


def test_the_product_curve_is_made_monotone() -> None:
    # r must not fall with more tokens (16 measured cheaper than 8), nor rise faster than
    # the tokens (a call of 4 tokens dearer than twice one of 2)
    curve = cost.product_curve([(16, 1.7), (1, 1.0), (2, 1.0), (8, 1.8), (4, 2.5)])
    assert curve == ((1, 1.0), (2, 1.0), (4, 2.0), (8, 2.0), (16, 2.0))
    assert cost.curve_rate(curve, 0.5) == 1.0  # below the first point: its rate
    assert cost.curve_rate(curve, 3) == pytest.approx(1.5)  # linear between points
    assert cost.curve_rate(curve, 32) == pytest.approx(4.0)  # beyond: per token as the last


def test_a_measured_product_curve_replaces_the_roofline_on_cpu_only() -> None:
    curve = {"1": 1e-11, "8": 2e-11, "32": 4e-11}
    cpu = a_node("c").tflops(1).bandwidth(100).timings(products=curve).build()
    workload = cost.Workload(max_sequences=8, max_context_tokens=2, runtime_overhead_bytes=0)
    at = cost.product_seconds_per_byte
    assert at(PROFILE, cpu, workload, batch=8) == pytest.approx(2e-11)
    assert at(PROFILE, cpu, workload, batch=20) == pytest.approx(3e-11)
    gpu = a_node("g").memory("8Gi").gpu().timings(products=curve).build()
    # an L4 stage: max(1 / 300 GB/s, 2 x 8 / (2 B x 121 TFLOP/s))
    assert at(PROFILE, gpu, workload, batch=8) == pytest.approx(1 / 300e9)
    costed = cost.evaluate(PROFILE, a_cluster(
        a_node("c").tflops(1).bandwidth(100).memory("10Gi").timings(products=curve)
    ).build(), workload, nodes=["c"], bounds=[0, 2])  # fmt: skip
    assert costed.stages[0].compute_batch == pytest.approx(3e9 * 2e-11 + 8 * 1 * 1000 * 2 / 100e9)
