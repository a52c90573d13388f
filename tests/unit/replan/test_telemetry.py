"""Operator metrics: what each recording call shows in the Prometheus exposition.

Covers: plans computed by result, plan duration, re-plans by cause and outcome, pipelines
by phase (a pipeline moving between phases is counted once; forgotten ones vanish), and
how node metrics usage is folded into usable memory.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from llmpipe_operator import telemetry
from llmpipe_operator.planning import live


def samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = telemetry.exposition().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(name: str, **labels: str) -> float:
    return samples().get((name, tuple(sorted(labels.items()))), 0.0)


def test_plans_are_counted_and_timed() -> None:
    before = value("llmpipe_plans_computed_total", result="feasible")
    count_before = value("llmpipe_plan_duration_seconds_count")
    with telemetry.timed_plan():
        telemetry.plan_computed(feasible=True)
    telemetry.plan_computed(feasible=False)
    assert value("llmpipe_plans_computed_total", result="feasible") == before + 1
    assert value("llmpipe_plans_computed_total", result="infeasible") >= 1
    assert value("llmpipe_plan_duration_seconds_count") == count_before + 1


def test_replans_are_counted_by_cause_and_outcome() -> None:
    before = value("llmpipe_replans_total", cause="not-ready", outcome="switched")
    telemetry.replanned(cause="not-ready", outcome="switched")
    telemetry.replanned(cause="not-ready", outcome="switched")
    assert value("llmpipe_replans_total", cause="not-ready", outcome="switched") == before + 2


def test_pipelines_are_counted_once_in_their_current_phase() -> None:
    # The gauge is process-wide: other tests' pipelines may be counted already.
    phases = ("Ready", "Deploying", "Failed")
    before = {phase: value("llmpipe_pipelines", phase=phase) for phase in phases}
    telemetry.set_phase("telemetry-test", "a", "Deploying")
    telemetry.set_phase("telemetry-test", "b", "Deploying")
    telemetry.set_phase("telemetry-test", "a", "Ready")
    assert value("llmpipe_pipelines", phase="Ready") == before["Ready"] + 1
    assert value("llmpipe_pipelines", phase="Deploying") == before["Deploying"] + 1
    assert ("llmpipe_pipelines", (("phase", "Failed"),)) in samples()  # every phase exported
    assert value("llmpipe_pipelines", phase="Failed") == before["Failed"]
    telemetry.forget_pipeline("telemetry-test", "a")
    telemetry.forget_pipeline("telemetry-test", "b")
    assert {phase: value("llmpipe_pipelines", phase=phase) for phase in phases} == before


def test_usable_memory_keeps_the_pipelines_own_stages_in_the_budget() -> None:
    gi = 1 << 30
    assert live.usable_memory(8 * gi, used=None) == 8 * gi  # no metrics-server
    assert live.usable_memory(8 * gi, used=3 * gi) == 5 * gi
    # 3 GiB in use of which 2 GiB is our own stage: only 1 GiB belongs to others
    assert live.usable_memory(8 * gi, used=3 * gi, own_stage_bytes=2 * gi) == 7 * gi
    assert live.usable_memory(8 * gi, used=1 * gi, own_stage_bytes=2 * gi) == 8 * gi
    assert live.usable_memory(2 * gi, used=5 * gi) == 0
