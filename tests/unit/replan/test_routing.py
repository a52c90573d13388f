"""The re-planner's routing: which node events reach which pipelines, and how urgently.

Covers (no API calls are made by these paths; the clock is injected): the initial node
listing is not a change; a change on a planned node is urgent for its pipeline only; a node
outside a pipeline's placement never reaches it; a node becoming eligible does; flapping
labels collect into one burst per window; deleted pipelines and invalid specs are not
tracked; the spec's debounce window is honoured.
"""

from __future__ import annotations

import copy
from typing import Any

from llmpipe_operator.planning.replan import ChangeKind
from llmpipe_operator.reconcile import replan as replanning
from tests.support.models import TINY_LLAMA_CONFIG

from .builders import a_node


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def a_pipeline(
    name: str,
    *,
    planned: tuple[str, ...] = (),
    selector: dict[str, str] | None = None,
    debounce: float = 10.0,
    namespace: str = "team-a",
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {
            "name": "tiny",
            "source": {"hostPath": {"path": "/models/tiny"}},
            "config": copy.deepcopy(TINY_LLAMA_CONFIG),
        },
        "replan": {"debounceSeconds": debounce},
    }
    if selector:
        spec["placement"] = {"nodeSelector": selector}
    return {
        "apiVersion": "llmpipe.io/v1alpha1",
        "kind": "LLMPipeline",
        "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}"},
        "spec": spec,
        "status": {"plan": {"stages": [{"index": i, "node": n} for i, n in enumerate(planned)]}},
    }


def replanner_with(*pipelines: dict[str, Any], nodes: list[dict[str, Any]]):
    clock = FakeClock()
    rp = replanning.Replanner(client=None, clock=clock)  # type: ignore[arg-type]
    for body in pipelines:
        rp.pipeline_event("ADDED", body)
    for node in nodes:
        assert rp.node_event(None, node) == []  # the initial listing changes nothing
    return rp, clock


def edge(name: str) -> Any:
    return a_node(name).label("llmpipe.io/tier", "edge")


def test_a_planned_node_going_not_ready_is_urgent_for_its_pipeline_only() -> None:
    rp, clock = replanner_with(
        a_pipeline("chat", planned=("orin-a", "orin-b")),
        a_pipeline("other", planned=("gpu-1",), selector={"pool": "gpu"}),
        nodes=[edge("orin-a").build(), edge("orin-b").build()],
    )
    affected = rp.node_event("MODIFIED", edge("orin-b").not_ready().build())
    assert affected == [("team-a", "chat")]
    chat = rp.pipelines[("team-a", "chat")]
    assert chat.debouncer.due(clock.now)  # at once, no debounce
    assert [c.kind for c in chat.debouncer.pending] == [ChangeKind.NOT_READY]
    assert rp.pipelines[("team-a", "other")].debouncer.pending == ()


def test_a_removed_planned_node_is_urgent() -> None:
    rp, clock = replanner_with(
        a_pipeline("chat", planned=("orin-a", "orin-b")),
        nodes=[edge("orin-a").build(), edge("orin-b").build()],
    )
    assert rp.node_event("DELETED", edge("orin-b").build()) == [("team-a", "chat")]
    assert rp.pipelines[("team-a", "chat")].debouncer.due(clock.now)
    assert "orin-b" not in rp.nodes


def test_a_new_eligible_node_waits_for_the_window() -> None:
    rp, clock = replanner_with(
        a_pipeline("chat", planned=("orin-a",), debounce=10.0), nodes=[edge("orin-a").build()]
    )
    assert rp.node_event("ADDED", edge("gpu-9").build()) == [("team-a", "chat")]
    chat = rp.pipelines[("team-a", "chat")]
    assert not chat.debouncer.due(clock.now)
    clock.now += 10.0
    assert chat.debouncer.due(clock.now)


def test_a_node_outside_the_placement_never_reaches_the_pipeline() -> None:
    rp, _ = replanner_with(
        a_pipeline("chat", planned=("gpu-1",), selector={"pool": "gpu"}),
        nodes=[a_node("gpu-1").label("pool", "gpu").build(), a_node("cpu-1").build()],
    )
    assert rp.node_event("MODIFIED", a_node("cpu-1").memory("64Gi").build()) == []
    assert rp.node_event("ADDED", a_node("cpu-2").build()) == []


def test_a_node_that_starts_matching_the_selector_is_routed() -> None:
    rp, _ = replanner_with(
        a_pipeline("chat", planned=("gpu-1",), selector={"pool": "gpu"}),
        nodes=[a_node("gpu-1").label("pool", "gpu").build(), a_node("cpu-1").build()],
    )
    labelled = a_node("cpu-1").label("pool", "gpu").build()
    assert rp.node_event("MODIFIED", labelled) == [("team-a", "chat")]


def test_a_flapping_label_collects_into_one_burst() -> None:
    rp, clock = replanner_with(
        a_pipeline("chat", planned=("orin-a",), debounce=10.0),
        nodes=[edge("orin-a").build(), edge("orin-b").build()],
    )
    chat = rp.pipelines[("team-a", "chat")]
    for i in range(8):
        clock.now += 1.0
        flap = edge("orin-b").label("llmpipe.io/uplink-mbps", str(100 if i % 2 else 40))
        rp.node_event("MODIFIED", flap.build())
        assert not chat.debouncer.due(clock.now)
    assert len(chat.debouncer.pending) == 8
    assert chat.debouncer.due_at() == 101.0 + 10.0


def test_heartbeats_reach_nobody() -> None:
    rp, _ = replanner_with(a_pipeline("chat", planned=("orin-a",)), nodes=[edge("orin-a").build()])
    assert rp.node_event("MODIFIED", edge("orin-a").heartbeat("t9").build()) == []


def test_deleted_pipelines_and_invalid_specs_are_not_tracked() -> None:
    rp, _ = replanner_with(a_pipeline("chat", planned=("orin-a",)), nodes=[edge("orin-a").build()])
    rp.pipeline_event("DELETED", a_pipeline("chat"))
    assert rp.pipelines == {}
    broken = a_pipeline("broken")
    broken["spec"]["replan"] = {"improvementMargin": 5}
    rp.pipeline_event("ADDED", broken)
    assert rp.pipelines == {}


def test_planned_nodes_follow_the_status() -> None:
    rp, _ = replanner_with(a_pipeline("chat", planned=("orin-a",)), nodes=[edge("orin-a").build()])
    rp.pipeline_event("MODIFIED", a_pipeline("chat", planned=("orin-a", "orin-b"), debounce=3))
    chat = rp.pipelines[("team-a", "chat")]
    assert chat.planned == {"orin-a", "orin-b"}
    assert chat.debouncer.window_seconds == 3


def test_usage_by_others_leaves_the_pipelines_own_stages_in_the_budget() -> None:
    from llmpipe_operator.k8s import metrics_api

    usage = metrics_api.NodeUsage(True, {"orin-a": 5 << 30, "gpu-1": 1 << 30}, "", 0.0)
    own = replanning.own_stage_memory({"stages": [{"node": "orin-a", "memoryBytes": 3 << 30}]})
    assert replanning.others_usage(usage, own) == {"orin-a": 2 << 30, "gpu-1": 1 << 30}


def test_a_completed_switch_is_timed() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from llmpipe_operator import telemetry

    def switches() -> float:
        families = text_string_to_metric_families(telemetry.exposition().decode())
        return next(
            s.value
            for f in families
            for s in f.samples
            if s.name == "llmpipe_switch_duration_seconds_count"
        )

    rp, _ = replanner_with(a_pipeline("chat", planned=("orin-a",)), nodes=[])
    before = switches()
    rolling = a_pipeline("chat", planned=("orin-b",))
    rolling["status"].update(
        planHash="new", servingPlanHash="old", rolloutStarted="2026-01-01T00:00:00Z"
    )
    rp.pipeline_event("MODIFIED", rolling)
    assert switches() == before  # still switching
    done = copy.deepcopy(rolling)
    done["status"]["servingPlanHash"] = "new"
    rp.pipeline_event("MODIFIED", done)
    assert switches() == before + 1
    rp.pipeline_event("MODIFIED", done)  # the same state again is not another switch
    assert switches() == before + 1


def test_a_node_that_registers_not_ready_reads_as_added_once_it_is_ready() -> None:
    rp, _ = replanner_with(
        a_pipeline("chat", planned=("orin-a",), debounce=10.0), nodes=[edge("orin-a").build()]
    )
    starting = edge("gpu-9").not_ready().taint("node.kubernetes.io/not-ready")
    assert rp.node_event("ADDED", starting.build()) == []  # not usable yet
    ready_but_tainted = edge("gpu-9").taint("node.kubernetes.io/not-ready")
    assert rp.node_event("MODIFIED", ready_but_tainted.build()) == []  # still not usable
    assert rp.node_event("MODIFIED", edge("gpu-9").build()) == [("team-a", "chat")]
    labelled = edge("gpu-9").label("llmpipe.io/tflops", "20").build()
    assert rp.node_event("MODIFIED", labelled) == [("team-a", "chat")]
    pending = rp.pipelines[("team-a", "chat")].debouncer.pending
    assert [c.text for c in pending] == [
        "node gpu-9 added",
        "node gpu-9 labels changed (llmpipe.io/tflops)",
    ]


def test_labels_kubernetes_maintains_reach_nobody() -> None:
    rp, _ = replanner_with(a_pipeline("chat", planned=("orin-a",)), nodes=[edge("orin-a").build()])
    arch = edge("orin-a").label("beta.kubernetes.io/arch", "amd64").build()
    assert rp.node_event("MODIFIED", arch) == []


def test_a_removal_seen_before_the_plan_that_uses_the_node_turns_urgent() -> None:
    rp, clock = replanner_with(a_pipeline("chat"), nodes=[edge("orin-a").build()])
    # the node watch is ahead of the pipeline watch: no plan is known yet
    assert rp.node_event("DELETED", edge("orin-a").build()) == [("team-a", "chat")]
    chat = rp.pipelines[("team-a", "chat")]
    assert not chat.debouncer.due(clock.now)
    rp.pipeline_event("MODIFIED", a_pipeline("chat", planned=("orin-a",)))
    assert chat.debouncer.due(clock.now)


def test_a_measured_drift_queues_a_re_plan_of_that_pipeline_within_the_window() -> None:
    rp, clock = replanner_with(
        a_pipeline("chat", planned=("orin-a",), debounce=10.0),
        a_pipeline("other", planned=("orin-a",)),
        nodes=[edge("orin-a").build()],
    )
    rp.measured_drift(("team-a", "chat"), {"orin-a": 2.5})
    rp.measured_drift(("team-a", "gone"), {"orin-a": 2.5})  # no longer tracked: ignored
    chat = rp.pipelines[("team-a", "chat")]
    assert [(c.node, c.kind) for c in chat.debouncer.pending] == [("orin-a", ChangeKind.MEASURED)]
    assert "2.5x" in chat.debouncer.pending[0].text
    assert not chat.debouncer.due(clock.now)  # debounced like any node change
    clock.now += 10.0
    assert chat.debouncer.due(clock.now)
    assert rp.pipelines[("team-a", "other")].debouncer.pending == ()
