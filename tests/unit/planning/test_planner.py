"""The planner: every layer covered once and in order, memory and placement respected,
the exact optimum versus brute force on random small instances (both objectives), the
heuristic above 8 nodes (feasible, never below its lower bound), the lower bound never
above the true optimum, infeasible inputs named by their shortfall, and the plan JSON;
the fixed costs and the round of K micro-batches (with a flat CPU product curve a second
equal stage gains nothing but its messages, with a FLOP-bound roofline it halves the
round; a node's per-layer fixed cost moves layers off it); a draft model's memory on
stage 0 (in the brute-force draws too), and the shortfall it causes named."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmpipe_operator.planning import cost, inventory, planner, profiles, search

from .brute import brute_force
from .builders import GiB, MiB, a_cluster, a_node, a_profile
from .strategies import placements, small_clusters, small_profiles, workloads

objectives = pytest.mark.parametrize("objective", ["throughput", "latency"])
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _plan_or_none(
    profile: profiles.ModelProfile,
    cluster: inventory.Inventory,
    workload: planner.Workload,
    placement: planner.Placement,
) -> planner.Plan | None:
    try:
        return planner.plan_pipeline(profile, cluster, workload=workload, placement=placement)
    except planner.PlanInfeasible:
        return None


def assert_within_the_device(
    stage: planner.Stage, node: inventory.Node, workload: planner.Workload
) -> None:
    """A stage on a discrete GPU puts weights + KV cache within nvidia.com/gpu.memory less
    R and asks the node for R; anywhere else (CPU, a unified-memory Jetson) weights + KV +
    R fit the node's memory. Read from the labels, not from the cost model."""
    has_gpu = "nvidia.com/gpu.product" in node.labels
    assert stage.device == ("cuda" if has_gpu and workload.device != "cpu" else "cpu")
    if workload.device == "cuda":
        assert has_gpu
    gpu_mib = node.labels.get("nvidia.com/gpu.memory")
    product = node.labels.get("nvidia.com/gpu.product", "").lower()
    discrete = stage.device == "cuda" and "orin" not in product
    if discrete:
        assert gpu_mib is not None
        weights_and_kv = stage.memory_bytes - workload.runtime_overhead_bytes
        assert weights_and_kv <= int(gpu_mib) * 2**20 - workload.runtime_overhead_bytes
        assert stage.host_bytes == workload.runtime_overhead_bytes <= node.memory_bytes
    else:
        assert stage.host_bytes == stage.memory_bytes <= node.memory_bytes


def assert_valid(
    plan: planner.Plan,
    profile: profiles.ModelProfile,
    cluster: inventory.Inventory,
    workload: planner.Workload,
    placement: planner.Placement,
) -> None:
    """Layers covered once and in order, memory within each node, placement respected."""
    stages = plan.stages
    assert [s.index for s in stages] == list(range(len(stages)))
    assert stages[0].layer_start == 0 and stages[-1].layer_end == profile.num_layers
    for before, after in itertools.pairwise(stages):
        assert before.layer_end == after.layer_start
    assert all(s.layer_start < s.layer_end for s in stages)
    assert len({s.node for s in stages}) == len(stages)
    for s in stages:
        expected = cost.memory_bytes(profile, workload, s.layer_start, s.layer_end)
        assert s.memory_bytes == expected
        assert_within_the_device(s, cluster.node(s.node), workload)
        assert s.has_embedding == (s.index == 0)
        assert s.has_head == (s.index == len(stages) - 1)
    if placement.first_stage == "edge":
        assert cluster.node(stages[0].node).tier == "edge"
    if placement.last_stage == "edge":
        assert cluster.node(stages[-1].node).tier == "edge"
    if placement.max_stages is not None:
        assert len(stages) <= placement.max_stages
    assert plan.est_tokens_per_second == pytest.approx(
        workload.max_sequences / plan.bottleneck_seconds
    )


@contextlib.contextmanager
def range_minimum_path() -> Iterator[None]:
    """Make the search take its range-minimum path (the one large models take) even on
    the small instances brute force can check."""
    saved = search.DENSE_CELLS
    search.DENSE_CELLS = 0
    try:
        yield
    finally:
        search.DENSE_CELLS = saved


@PROPERTY
@given(small_profiles(), small_clusters(), workloads(), placements())
def test_exact_plan_is_valid_and_equals_brute_force(
    profile: profiles.ModelProfile,
    cluster: inventory.Inventory,
    workload: planner.Workload,
    placement: planner.Placement,
) -> None:
    check_against_brute_force(profile, cluster, workload, placement)


@PROPERTY
@given(small_profiles(), small_clusters(), workloads(), placements())
def test_exact_plan_on_the_range_minimum_path_equals_brute_force(
    profile: profiles.ModelProfile,
    cluster: inventory.Inventory,
    workload: planner.Workload,
    placement: planner.Placement,
) -> None:
    with range_minimum_path():
        check_against_brute_force(profile, cluster, workload, placement)


def check_against_brute_force(
    profile: profiles.ModelProfile,
    cluster: inventory.Inventory,
    workload: planner.Workload,
    placement: planner.Placement,
) -> None:
    best = brute_force(profile, cluster, workload=workload, placement=placement)
    plan = _plan_or_none(profile, cluster, workload, placement)
    assert (plan is None) == (best is None)
    if plan is None or best is None:
        return
    assert_valid(plan, profile, cluster, workload, placement)
    assert plan.exact
    assert plan.objective_value == pytest.approx(best[0], rel=1e-9)
    if workload.objective == "throughput":  # ties go to the lower token latency
        assert plan.token_latency_seconds == pytest.approx(best[1], rel=1e-9)


paths = pytest.mark.parametrize("path", ["dense", "range-minimum"])


@paths
@objectives
def test_exact_on_eight_nodes_with_many_layers(objective: str, path: str) -> None:
    """The largest exact case, 8 nodes, against brute force over orders with 5 layers."""
    nodes = [
        a_node(f"n{i}")
        .memory(f"{1 + i % 3}Gi")
        .tflops(1 + i)
        .bandwidth(20 + 15 * i)
        .uplink(100 * (1 + i % 2))
        for i in range(8)
    ]
    nodes = [n.cloud() if i % 3 == 0 else n for i, n in enumerate(nodes)]
    cluster = a_cluster(*nodes).link("n0", "n5", mbps=5, rtt_ms=50).build()
    profile = a_profile(5, layer_size=600 * MiB).build()
    workload = planner.Workload(objective=objective, runtime_overhead_bytes=256 * MiB)  # type: ignore[arg-type]
    placement = planner.Placement(first_stage="edge")
    best = brute_force(profile, cluster, workload=workload, placement=placement)
    with range_minimum_path() if path == "range-minimum" else contextlib.nullcontext():
        plan = planner.plan_pipeline(profile, cluster, workload=workload, placement=placement)
    assert best is not None and plan.exact
    assert plan.objective_value == pytest.approx(best[0], rel=1e-9)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_profiles(), small_clusters(min_nodes=1, max_nodes=4), workloads(), placements())
def test_lower_bound_never_exceeds_the_optimum(
    profile: profiles.ModelProfile,
    cluster: inventory.Inventory,
    workload: planner.Workload,
    placement: planner.Placement,
) -> None:
    best = brute_force(profile, cluster, workload=workload, placement=placement)
    if best is None:
        return
    nodes = planner.eligible_nodes(profile, cluster, workload)
    problem = planner._problem(profile, cluster, workload, placement, nodes)
    assert search.lower_bound(problem) <= best[0] * (1 + 1e-9)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    small_profiles(max_layers=12),
    small_clusters(min_nodes=9, max_nodes=14),
    workloads(),
    placements(),
)
def test_heuristic_plan_is_valid_and_above_its_lower_bound(
    profile: profiles.ModelProfile,
    cluster: inventory.Inventory,
    workload: planner.Workload,
    placement: planner.Placement,
) -> None:
    plan = _plan_or_none(profile, cluster, workload, placement)
    if plan is None:
        return
    assert_valid(plan, profile, cluster, workload, placement)
    if len(planner.eligible_nodes(profile, cluster, workload)) > 8:
        assert not plan.exact
    assert plan.lower_bound is not None
    assert plan.lower_bound <= plan.objective_value * (1 + 1e-9)


@objectives
def test_heuristic_matches_exact_search_on_a_uniform_fleet(objective: str) -> None:
    """8 identical edge boxes + 2 GPUs: the heuristic finds the exact optimum (checked by
    running the exact search on all 10 nodes, slower than the CLI wants but possible)."""
    boxes = [a_node(f"box{i}").memory("3Gi").tflops(2).bandwidth(50).uplink(1000) for i in range(8)]
    gpus = [
        a_node(f"gpu{i}").cloud().memory("12Gi").tflops(60).bandwidth(600).uplink(1000)
        for i in range(2)
    ]
    cluster = a_cluster(*boxes, *gpus).build()
    profile = a_profile(16, layer_size=1 * GiB).build()
    workload = planner.Workload(objective=objective)  # type: ignore[arg-type]
    placement = planner.Placement(first_stage="edge")
    plan = planner.plan_pipeline(profile, cluster, workload=workload, placement=placement)
    problem = planner._problem(
        profile, cluster, workload, placement, planner.eligible_nodes(profile, cluster, workload)
    )
    exact = search.exact(problem)
    assert exact is not None and not plan.exact
    assert plan.objective_value == pytest.approx(
        problem.evaluate(exact).value(workload.objective), rel=1e-9
    )


def test_throughput_plan_avoids_a_slow_link() -> None:
    cluster = a_cluster(
        a_node("edge-a").memory("2Gi").uplink(1000),
        a_node("edge-b").memory("2Gi").uplink(1000),
        a_node("far").memory("2Gi").uplink(1),
    ).build()
    profile = a_profile(4, layer_size=300 * MiB).build()
    plan = planner.plan_pipeline(
        profile, cluster, workload=planner.Workload(runtime_overhead_bytes=0)
    )
    assert "far" not in {s.node for s in plan.stages}


def test_latency_prefers_one_fast_node_over_a_chain() -> None:
    cluster = a_cluster(
        a_node("small-a").memory("1Gi").tflops(10).bandwidth(200),
        a_node("small-b").memory("1Gi").tflops(10).bandwidth(200),
        a_node("big").memory("8Gi").tflops(10).bandwidth(200),
    ).build()
    profile = a_profile(4).build()
    plan = planner.plan_pipeline(profile, cluster, workload=planner.Workload(objective="latency"))
    assert [s.node for s in plan.stages] == ["big"]
    assert plan.token_latency_seconds == pytest.approx(plan.stages[0].compute_seconds)


def test_plans_are_deterministic() -> None:
    cluster = a_cluster(*(a_node(f"twin{i}") for i in range(6))).build()
    profile = a_profile(12).build()
    first = planner.plan_pipeline(profile, cluster, workload=planner.Workload())
    again = planner.plan_pipeline(profile, cluster, workload=planner.Workload())
    assert first == again


# infeasible --------------------------------------------------------------------------


def test_total_memory_shortfall_is_named() -> None:
    cluster = a_cluster(*(a_node(f"n{i}").memory("2Gi") for i in range(5))).build()
    profile = a_profile(20, layer_size=700 * MiB).build()
    workload = planner.Workload(max_sequences=4, max_context_tokens=2048)
    with pytest.raises(planner.PlanInfeasible) as raised:
        planner.plan_pipeline(profile, cluster, workload=workload)
    error = raised.value
    weights = 20 * 700 * MiB + 256 * MiB
    kv = 4 * 2048 * 1024 * 20
    assert error.reason == "total-memory"
    assert (error.weight_bytes, error.kv_cache_bytes) == (weights, kv)
    assert error.needed_bytes == weights + kv
    assert error.available_bytes == 5 * (2 * GiB - 512 * MiB)
    assert error.eligible_nodes == 5
    assert str(error).startswith(
        "needs 13.9 GiB of weights + 160 MiB of KV cache; the 5 eligible nodes offer 7.5 GiB"
    )
    assert "short by 6.6 GiB" in str(error)


def test_largest_layer_that_fits_nowhere_is_named() -> None:
    cluster = a_cluster(a_node("a").memory("1Gi"), a_node("b").memory("1Gi")).build()
    profile = a_profile(3).layers(100 * MiB, 700 * MiB, 100 * MiB).build()
    with pytest.raises(planner.PlanInfeasible, match=r"largest single layer \(700 MiB") as raised:
        planner.plan_pipeline(profile, cluster, workload=planner.Workload())
    assert raised.value.reason == "largest-layer"
    assert "fits nowhere" in str(raised.value)


def test_nodes_that_match_but_have_no_room_are_not_called_0_eligible() -> None:
    cluster = a_cluster(*(a_node(f"n{i}").memory("400Mi") for i in range(5))).build()
    with pytest.raises(planner.PlanInfeasible) as raised:
        planner.plan_pipeline(a_profile(4).build(), cluster, workload=planner.Workload())
    text = str(raised.value)
    assert "0 eligible" not in text
    assert "none of the 5 matching nodes has room for the smallest stage" in text
    assert "largest free: 400 MiB" in text


def test_first_stage_on_edge_without_room_on_the_edge() -> None:
    cluster = a_cluster(
        a_node("tiny-edge").edge().memory("700Mi"), a_node("gpu").cloud().memory("40Gi")
    ).build()
    profile = a_profile(4).embed(1 * GiB).build()
    placement = planner.Placement(first_stage="edge")
    with pytest.raises(
        planner.PlanInfeasible, match="first stage must run on an edge node"
    ) as raised:
        planner.plan_pipeline(profile, cluster, workload=planner.Workload(), placement=placement)
    assert raised.value.reason == "first-stage"
    # without the rule the GPU holds everything
    assert (
        planner.plan_pipeline(profile, cluster, workload=planner.Workload()).stages[0].node == "gpu"
    )


def test_max_stages_shortfall_is_named() -> None:
    cluster = a_cluster(*(a_node(f"n{i}").memory("2Gi") for i in range(4))).build()
    profile = a_profile(8, layer_size=400 * MiB).build()
    placement = planner.Placement(max_stages=2)
    with pytest.raises(planner.PlanInfeasible, match="with at most 2 stages") as raised:
        planner.plan_pipeline(profile, cluster, workload=planner.Workload(), placement=placement)
    assert raised.value.reason == "max-stages"
    assert len(planner.plan_pipeline(profile, cluster, workload=planner.Workload()).stages) >= 3


def test_no_nodes_at_all() -> None:
    empty = inventory.Inventory(nodes=())
    with pytest.raises(planner.PlanInfeasible, match="no nodes"):
        planner.plan_pipeline(a_profile().build(), empty, workload=planner.Workload())


# plan JSON --------------------------------------------------------------------------


def test_plan_json_has_exactly_the_design_fields_and_round_trips() -> None:
    cluster = a_cluster(a_node("a").memory("1Gi"), a_node("b").memory("1Gi")).build()
    plan = planner.plan_pipeline(
        a_profile(4).build(), cluster, workload=planner.Workload(runtime_overhead_bytes=0)
    )
    data = json.loads(json.dumps(plan.to_dict()))
    assert list(data) == [
        "objective",
        "bottleneckSeconds",
        "tokenLatencySeconds",
        "estTokensPerSecond",
        "estTimeToFirstTokenSeconds",
        "prefillChunkTokens",
        "estChunkedTimeToFirstTokenSeconds",
        "stages",
    ]
    assert list(data["stages"][0]) == [
        "index",
        "node",
        "layerStart",
        "layerEnd",
        "hasEmbedding",
        "hasHead",
        "memoryBytes",
        "computeSeconds",
        "transferSeconds",
        "device",
        "dtype",
        "gpus",
        "hostMemoryBytes",
    ]
    assert planner.Plan.from_dict(data) == dataclasses.replace(plan, lower_bound=None)


def test_a_plan_written_before_devices_reads_as_cpu_stages() -> None:
    cluster = a_cluster(a_node("a").memory("1Gi")).build()
    workload = planner.Workload(runtime_overhead_bytes=0)
    plan = planner.plan_pipeline(a_profile(2).build(), cluster, workload=workload)
    data = plan.to_dict()
    for stage in data["stages"]:
        for key in ("device", "dtype", "gpus", "hostMemoryBytes"):
            del stage[key]
    stage = planner.Plan.from_dict(data).stages[0]
    assert (stage.device, stage.gpus, stage.host_bytes) == ("cpu", 0, stage.memory_bytes)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("objective", "speed"),
        ("max_sequences", 0),
        ("max_context_tokens", -1),
        ("runtime_overhead_bytes", -5),
    ],
)
def test_bad_workloads_are_refused(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field if field != "objective" else "objective"):
        planner.Workload(**{field: value})  # type: ignore[arg-type]


@given(
    st.sampled_from(["first_stage", "last_stage"]),
    st.text(min_size=1).filter(lambda t: t not in ("any", "edge")),
)
def test_bad_placements_are_refused(field: str, value: str) -> None:
    with pytest.raises(ValueError, match=field):
        planner.Placement(**{field: value})  # type: ignore[arg-type]


def test_edge_rule_without_any_edge_node() -> None:
    cluster = a_cluster(a_node("gpu").cloud().memory("40Gi")).build()
    placement = planner.Placement(last_stage="edge")
    with pytest.raises(planner.PlanInfeasible, match="no eligible node is an edge node") as raised:
        planner.plan_pipeline(
            a_profile().build(), cluster, workload=planner.Workload(), placement=placement
        )
    assert raised.value.reason == "last-stage"


TWINS = [a_node(n).memory("4Gi").tflops(1).bandwidth(1000).uplink(10000) for n in ("p", "q")]


def test_a_flat_product_curve_makes_one_stage_beat_two_equal_ones() -> None:
    # a CPU whose product of 2 tokens costs what one of 4 does: each of two stages reads its
    # half of the weights twice per round (two micro-batches of 2), as long as one stage
    # reading all of them once, and pays its messages on top
    flat = {"1": 1e-10, "4": 1e-10}
    cluster = a_cluster(*(n.timings(products=flat, hop=1e-3) for n in TWINS)).build()
    profile = a_profile(4).build()
    workload = planner.Workload(max_sequences=4, runtime_overhead_bytes=0)
    plan = planner.plan_pipeline(profile, cluster, workload=workload)
    assert len(plan.stages) == 1
    two = cost.evaluate(profile, cluster, workload, nodes=["p", "q"], bounds=[0, 2, 4])
    assert two.bottleneck_seconds > plan.bottleneck_seconds


def test_a_flop_bound_roofline_makes_two_equal_stages_beat_one() -> None:
    # 1 TFLOP/s and 1000 GB/s: FLOP-bound at 4 tokens, so halving each stage's weights
    # halves its step while the tokens per round stay S
    cluster = a_cluster(*(n.timings() for n in TWINS)).build()
    profile = a_profile(4).build()
    workload = planner.Workload(max_sequences=4, runtime_overhead_bytes=0)
    plan = planner.plan_pipeline(profile, cluster, workload=workload)
    assert len(plan.stages) == 2
    assert plan.exact


def test_a_per_layer_fixed_cost_moves_layers_off_a_node() -> None:
    profile = a_profile(8).build()
    workload = planner.Workload(max_sequences=4, runtime_overhead_bytes=0)
    even = a_cluster(*(n.timings() for n in TWINS)).build()
    layers = {s.node: s.layer_end - s.layer_start for s in planner.plan_pipeline(
        profile, even, workload=workload).stages}  # fmt: skip
    assert layers == {"p": 4, "q": 4}
    costly = a_cluster(TWINS[0].timings(layer=2e-3), TWINS[1].timings()).build()
    layers = {s.node: s.layer_end - s.layer_start for s in planner.plan_pipeline(
        profile, costly, workload=workload).stages}  # fmt: skip
    assert layers["p"] < layers["q"]


# a draft model on stage 0 ---------------------------------------------------------------


def _draft_profile() -> profiles.ModelProfile:
    """A 2-layer draft model: 2 x 50 MiB layers, 30 MiB embeddings, 40 MiB head, 1 KiB of KV
    per token and layer."""
    return (
        a_profile(2, layer_size=50 * MiB)
        .embed(30 * MiB)
        .head(40 * MiB)
        .kv_per_token_per_layer(1024)
    ).build()


def test_the_draft_term_is_its_weights_and_its_kv_cache_for_the_workload() -> None:
    workload = planner.Workload(max_sequences=4, max_context_tokens=2048)
    draft = _draft_profile()
    weights = 2 * 50 * MiB + 30 * MiB + 40 * MiB
    kv = 4 * 2048 * 1024 * 2
    assert cost.draft_weight_bytes(draft) == weights
    assert cost.draft_kv_bytes(draft, workload) == kv
    assert cost.draft_bytes(draft, workload) == weights + kv
    assert planner.with_draft(workload, draft).first_stage_bytes == weights + kv
    assert planner.with_draft(workload, None) == workload
    with pytest.raises(ValueError, match="first_stage_bytes"):
        planner.Workload(first_stage_bytes=-1)


def test_the_draft_model_goes_into_stage_0s_memory_only() -> None:
    cluster = a_cluster(*(a_node(f"n{i}").memory("2Gi") for i in range(3))).build()
    profile = a_profile(6, layer_size=300 * MiB).embed(100 * MiB).build()
    workload = planner.Workload(max_sequences=4, max_context_tokens=2048)
    drafted = planner.with_draft(workload, _draft_profile())
    plan = planner.plan_pipeline(profile, cluster, workload=drafted)
    draft = drafted.first_stage_bytes
    first, *rest = plan.stages
    assert first.memory_bytes == (
        cost.memory_bytes(profile, workload, first.layer_start, first.layer_end) + draft
    )
    assert first.draft_memory_bytes == draft
    for stage in rest:
        assert stage.draft_memory_bytes == 0
        assert stage.memory_bytes == cost.memory_bytes(
            profile, workload, stage.layer_start, stage.layer_end
        )
    data = plan.to_dict()
    assert data["stages"][0]["draftMemoryBytes"] == draft
    assert all("draftMemoryBytes" not in s for s in data["stages"][1:])
    assert planner.Plan.from_dict(data).stages[0].draft_memory_bytes == draft


def test_a_draft_model_moves_layers_off_stage_0s_node() -> None:
    # two equal nodes: the draft's 1400 MiB on stage 0 leaves it room for few layers
    cluster = a_cluster(a_node("a").memory("2Gi"), a_node("b").memory("2Gi")).build()
    profile = a_profile(8, layer_size=150 * MiB).build()
    workload = planner.Workload(max_sequences=1, max_context_tokens=128, runtime_overhead_bytes=0)
    plain = planner.plan_pipeline(profile, cluster, workload=workload)
    big = dataclasses.replace(workload, first_stage_bytes=1400 * MiB)
    drafted = planner.plan_pipeline(profile, cluster, workload=big)
    assert len(plain.stages) == 1  # without the draft one node holds the whole model
    assert len(drafted.stages) == 2
    assert drafted.stages[0].layer_end <= 4  # 2 GiB - 1400 MiB holds at most 4 layers
    assert drafted.stages[0].memory_bytes <= 2 * GiB


def test_a_draft_model_that_leaves_stage_0_no_room_is_named() -> None:
    cluster = a_cluster(a_node("a").memory("2Gi"), a_node("b").memory("2Gi")).build()
    profile = a_profile(4, layer_size=200 * MiB).embed(300 * MiB).build()
    workload = planner.Workload(max_sequences=1, max_context_tokens=128)
    big = dataclasses.replace(workload, first_stage_bytes=1300 * MiB)
    with pytest.raises(planner.PlanInfeasible) as raised:
        planner.plan_pipeline(profile, cluster, workload=big)
    error = raised.value
    assert error.reason == "first-stage"
    text = str(error)
    assert "+ 1.3 GiB for stage 0's draft model (weights + KV cache)" in text
    assert "stage 0 holds the draft model (1.3 GiB: weights + KV cache)" in text
    assert "largest: 1.5 GiB" in text
    kv = 1 * 128 * profile.kv_bytes_per_token_per_layer * 4
    assert error.needed_bytes == profile.total_weight_bytes + kv + 1300 * MiB
    assert text.endswith(
        "try a smaller spec.model.draft, fewer maxSequences or a shorter maxContextTokens"
    )
    # without the draft model the same cluster serves the model
    assert planner.plan_pipeline(profile, cluster, workload=workload).stages
