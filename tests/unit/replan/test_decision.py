"""Whether to switch plans, what a user reads about it, and the settings that steer it.

Covers: the improvement margin while the running plan is feasible (both objectives, at,
below and above the margin); a broken running plan switches whatever the figures; an
unchanged layout never switches; `plan_problems` names the node and the shortfall; the
cause text matches the issue's example; `spec.replan` parsing with defaults and errors.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmpipe_operator.planning import replan
from llmpipe_operator.planning.replan import ChangeKind, NodeChange

from .builders import a_plan

FOUR = (("jetson-1", 0, 6), ("orin-b", 6, 12), ("orin-c", 12, 18), ("gpu-1", 18, 22))
THREE = (("jetson-1", 0, 8), ("orin-c", 8, 16), ("gpu-1", 16, 22))

objectives = pytest.mark.parametrize("objective", ["throughput", "latency"])


def plans(objective: str, old_seconds: float, new_seconds: float):
    key = "bottleneck" if objective == "throughput" else "latency"
    return (
        a_plan(*FOUR, objective=objective, **{key: old_seconds}),
        a_plan(*THREE, objective=objective, **{key: new_seconds}),
    )


@objectives
@pytest.mark.parametrize(
    ("new_seconds", "switch"),
    [(0.079, True), (0.080, True), (0.081, False), (0.1, False), (0.2, False)],
    ids=["above-margin", "at-margin", "just-below", "equal", "worse"],
)
def test_a_feasible_plan_moves_only_for_the_margin(objective, new_seconds, switch) -> None:
    current, candidate = plans(objective, 0.1, new_seconds)
    decision = replan.decide_switch(current, candidate, margin=0.2)
    assert decision.switch is switch
    assert decision.improvement == pytest.approx((0.1 - new_seconds) / 0.1)
    assert ("below the margin" in decision.reason) is not switch


@objectives
def test_a_broken_plan_moves_even_to_a_slower_one(objective) -> None:
    current, candidate = plans(objective, 0.0182, 0.0249)
    problems = ["stage 1: node orin-b is no longer eligible"]
    decision = replan.decide_switch(current, candidate, problems=problems, margin=0.2)
    assert decision.switch
    assert "orin-b is no longer eligible" in decision.reason


def test_the_same_layout_never_switches() -> None:
    current = a_plan(*FOUR, bottleneck=0.1)
    candidate = a_plan(*FOUR, bottleneck=0.01)  # same placement, other estimate
    assert not replan.decide_switch(current, candidate, margin=0.2).switch


def test_no_running_plan_switches() -> None:
    assert replan.decide_switch(None, a_plan(*THREE), margin=0.2).switch


def test_a_reevaluated_running_objective_is_used_when_given() -> None:
    current, candidate = plans("throughput", 0.1, 0.09)
    # the running plan is now slower than recorded (its node was throttled): 0.09 vs 0.2
    decision = replan.decide_switch(current, candidate, margin=0.2, current_objective=0.2)
    assert decision.switch
    assert decision.improvement == pytest.approx(0.55)


@given(
    old=st.floats(1e-6, 10.0),
    new=st.floats(1e-6, 10.0),
    margin=st.floats(0.0, 0.99),
)
def test_margin_decision_matches_the_relative_improvement(old, new, margin) -> None:
    current = a_plan(*FOUR, bottleneck=old)
    candidate = a_plan(*THREE, bottleneck=new)
    decision = replan.decide_switch(current, candidate, margin=margin)
    assert decision.switch is ((old - new) / old >= margin)


@pytest.mark.parametrize("margin", [-0.1, 1.0, 2.0])
def test_a_margin_outside_zero_to_one_is_refused(margin) -> None:
    with pytest.raises(ValueError, match="margin"):
        replan.decide_switch(None, a_plan(*THREE), margin=margin)


def test_plan_problems_name_the_node_and_the_shortfall() -> None:
    plan = a_plan(*FOUR, memory=2 << 30)
    available = {"jetson-1": 8 << 30, "orin-c": 1 << 30, "gpu-1": 80 << 30}
    assert replan.plan_problems(plan, available) == [
        "stage 1: node orin-b is no longer eligible",
        f"stage 2: node orin-c offers {1 << 30} bytes, the stage needs {2 << 30}",
    ]
    available.update({"orin-b": 4 << 30, "orin-c": 2 << 30})
    assert replan.plan_problems(plan, available) == []


def test_the_cause_reads_like_the_issue_example() -> None:
    old = a_plan(*FOUR, bottleneck=0.0182)
    new = a_plan(*THREE, bottleneck=0.0249)
    change = NodeChange("orin-b", ChangeKind.NOT_READY, "node orin-b NotReady")
    assert (
        replan.describe([change], old, new)
        == "node orin-b NotReady: 4 stages -> 3, bottleneck 18.2 ms -> 24.9 ms"
    )


def test_the_cause_names_token_latency_for_the_latency_objective() -> None:
    old = a_plan(*FOUR, objective="latency", latency=1.5)
    new = a_plan(*THREE, objective="latency", latency=0.00005)
    change = NodeChange("gpu-2", ChangeKind.ADDED, "node gpu-2 added")
    assert replan.describe([change], old, new) == (
        "node gpu-2 added: 4 stages -> 3, token latency 1.50 s -> 50 µs"
    )


def test_a_burst_is_summarised_most_telling_first_without_repeats() -> None:
    burst = [
        NodeChange("e1", ChangeKind.LABELS, "node e1 labels changed (x)"),
        NodeChange("e1", ChangeKind.LABELS, "node e1 labels changed (x)"),
        NodeChange("e2", ChangeKind.NOT_READY, "node e2 NotReady"),
        NodeChange("e3", ChangeKind.ADDED, "node e3 added"),
        NodeChange("e4", ChangeKind.MEMORY, "node e4 allocatable memory 8Gi -> 4Gi"),
    ]
    assert replan.summarize_changes(burst) == (
        "node e3 added, node e2 NotReady, node e4 allocatable memory 8Gi -> 4Gi and 1 more"
    )
    assert replan.primary_kind(burst) is ChangeKind.ADDED
    assert replan.primary_kind([]) is None


def test_a_first_plan_is_described_without_an_arrow() -> None:
    assert replan.compare_plans(None, a_plan(*THREE, bottleneck=0.02)) == (
        "3 stages, bottleneck 20.0 ms"
    )


def test_settings_default_to_the_documented_values() -> None:
    settings = replan.ReplanSettings.from_spec(None)
    assert settings == replan.ReplanSettings(0.2, 15.0, 600.0)


def test_settings_parse_the_spec() -> None:
    spec = {"improvementMargin": 0.05, "debounceSeconds": 2, "switchTimeoutSeconds": "90"}
    assert replan.ReplanSettings.from_spec(spec) == replan.ReplanSettings(0.05, 2.0, 90.0)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"improvementMargin": 20}, "improvementMargin must be in \\[0, 1\\)"),
        ({"debounceSeconds": -1}, "debounceSeconds must be >= 0"),
        ({"switchTimeoutSeconds": 0}, "switchTimeoutSeconds must be > 0"),
        ({"debounceSeconds": "soon"}, "debounceSeconds must be a number"),
        ({"improvementMargin": True}, "improvementMargin must be a number"),
    ],
)
def test_bad_settings_are_refused_with_the_field_name(spec, message) -> None:
    with pytest.raises(ValueError, match=message):
        replan.ReplanSettings.from_spec(spec)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(2.5, "2.50 s"), (0.0182, "18.2 ms"), (0.00044, "440 µs"), (0.0004, "400 µs"),
     (5e-8, "50 ns")],
)  # fmt: skip
def test_figures_keep_three_significant_digits(seconds, text) -> None:
    assert replan.format_seconds(seconds) == text


def test_a_node_measured_slower_makes_the_running_plan_worse_and_a_switch_possible() -> None:
    from llmpipe_operator.planning import cost, planner
    from tests.unit.planning.builders import a_cluster, a_profile
    from tests.unit.planning.builders import a_node as a_planning_node

    profile = a_profile(8).build()
    workload = cost.Workload(runtime_overhead_bytes=0)

    def cluster(fast_tflops: float):
        return a_cluster(
            a_planning_node("fast").memory("4Gi").tflops(fast_tflops).bandwidth(1000),
            a_planning_node("slow").memory("4Gi").tflops(1).bandwidth(50),
        ).build()

    before = planner.plan_pipeline(profile, cluster(10), workload=workload).to_dict()
    assert before["stages"][0]["node"] == "fast" and len(before["stages"]) == 1
    slowed = cluster(0.01)  # the probe now says "fast" is a hundred times slower
    candidate = planner.plan_pipeline(profile, slowed, workload=workload).to_dict()
    now = replan.reevaluate(before, profile, slowed, workload)
    assert now is not None and now > replan.objective_seconds(before)
    # against the figure recorded at deploy time the candidate looks worse: no switch
    assert not replan.decide_switch(before, candidate, margin=0.2).switch
    # against the running plan re-costed on today's facts it is a clear gain
    assert replan.decide_switch(before, candidate, margin=0.2, current_objective=now).switch
    gone = a_cluster(a_planning_node("slow").memory("4Gi")).build()
    assert replan.reevaluate(before, profile, gone, workload) is None
