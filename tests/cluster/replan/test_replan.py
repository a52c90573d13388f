"""Re-planning on the real control plane (etcd, kube-apiserver, scheduler, controller
manager, kwok nodes) with the operator running as a process.

Covers: a node hosting a stage is removed -> a new plan without it, its pods Running on the
remaining nodes, status and Events saying why, the re-plan metric; a stage node going
NotReady -> the same, at once despite a long debounce window; a lost node nothing can
replace -> Planned=False naming the shortfall and a ReplanInfeasible Event; a cordoned stage
node ->
a zero-downtime switch (the user-facing Service's EndpointSlices, polled every 100 ms, never
lack a ready endpoint) and the old plan drains (`status.drainingPlans`, `Draining` and
`Drained` Events) before its pods go; a flapping node label -> at most one re-plan per
debounce window; a better node joining -> no switch below the improvement margin, a
switch above it; a switch that cannot complete -> the old plan keeps serving and the
pipeline is Degraded with the reason once the switch timeout passes; metrics.k8s.io
absent -> a note, not an error.
"""

from __future__ import annotations

import itertools
import math
import time

import pytest
from lightkube import AsyncClient, KubeConfig

from llmpipe_operator.k8s import metrics_api
from tests.support import wait

from .harness import EndpointWatch

# Three 52 MiB nodes, slow at compute (0.05 TFLOP/s): with 12 sequences in flight (WORKLOAD)
# the tiny model (about 80 MiB with KV cache and overhead) needs two of them, and its
# compute-bound stages run fastest on all three (a split shortens each micro-batch's
# products more than it adds messages; with 4 sequences the per-message costs win and the
# planner stops at two).
SMALL = {"tier": "edge", "memory": "52Mi", "tflops": 0.05}
WORKLOAD = {"maxSequences": 12}
# maxStages 1 and roomy nodes: the plan is the node with the most memory bandwidth, and the
# objective (bottleneck = weights / bandwidth, plus the fixed costs of a 100-TFLOP/s node,
# under 1 µs) scales with it: 2x the bandwidth improves it by 49.9 %, not 50.0 %.
ROOMY = {"tier": "cloud", "memory": "4Gi", "tflops": 100.0}


def new_plan_serving(old_hash: str):
    def check(st: dict) -> bool:
        return (
            st.get("phase") == "Ready"
            and st.get("planHash") not in (None, old_hash)
            and st.get("planHash") == st.get("servingPlanHash")
        )

    return check


def test_removing_a_stage_node_replans_without_it(lab, operator) -> None:
    for i in range(3):
        lab.add_node(f"e{i}", **SMALL)
    lab.apply_pipeline("chat", replan={"debounceSeconds": 30}, workload=WORKLOAD)
    first = lab.wait_ready("chat")
    planned = lab.planned_nodes(first)
    assert len(planned) == 3, first
    gone = planned[-1]

    lab.plane.remove_node(gone)

    # at once, not after the 30 s debounce window: the node hosted a stage
    st = lab.wait_status(
        "chat", new_plan_serving(first["planHash"]), what="a new plan serving", timeout=20
    )
    after = lab.planned_nodes(st)
    assert gone not in after and len(after) == 2
    pods = lab.wait_pods_running("chat", st)
    assert {p.spec.nodeName for p in pods} == set(after)
    cause = st["replan"]["lastCause"]
    assert cause.startswith(f"node {gone} removed: 3 stages -> 2, bottleneck ")
    assert st["replan"]["lastDecision"].startswith("switched: the running plan is broken")
    assert st["replan"]["count"] == 1
    event = wait.event(lab.client, lab.namespace, involved="chat", reason="Replanned")
    assert event.message == cause
    # the old plan's objects are removed once nothing routes to them (its pod on the deleted
    # node is left to the pod garbage collector, as in any cluster)
    wait.until(
        lambda: not lab.plan_objects("chat", first["planHash"]),
        what="the old plan's Deployments, Services and ConfigMap to be gone",
        timeout=60,
    )
    metrics = operator.metrics()
    assert 'llmpipe_replans_total{cause="removed",outcome="switched"} 1.0' in metrics
    assert 'llmpipe_pipelines{phase="Ready"} 1.0' in metrics


def test_a_stage_node_going_not_ready_replans_at_once(lab, operator) -> None:
    for i in range(3):
        lab.add_node(f"e{i}", **SMALL)
    lab.apply_pipeline("chat", replan={"debounceSeconds": 30}, workload=WORKLOAD)
    first = lab.wait_ready("chat")
    sick = lab.planned_nodes(first)[1]

    lab.plane.set_not_ready(sick)  # kwok stops its heartbeat, as for a dead kubelet

    st = lab.wait_status(
        "chat", new_plan_serving(first["planHash"]), what="a new plan serving", timeout=20
    )
    assert sick not in lab.planned_nodes(st)
    lab.wait_pods_running("chat", st)
    assert st["replan"]["lastCause"].startswith(f"node {sick} NotReady: 3 stages -> 2, ")
    event = wait.event(lab.client, lab.namespace, involved="chat", reason="Replanned")
    assert event.message == st["replan"]["lastCause"]


def test_losing_a_node_nothing_can_replace_says_what_is_short(lab, operator) -> None:
    for i in range(2):  # the model needs both
        lab.add_node(f"e{i}", **SMALL)
    lab.apply_pipeline("chat", replan={"debounceSeconds": 30}, workload=WORKLOAD)
    first = lab.wait_ready("chat")
    gone = lab.planned_nodes(first)[0]

    lab.plane.remove_node(gone)

    st = lab.wait_status(
        "chat",
        lambda s: (s.get("replan") or {}).get("lastDecision", "").startswith("infeasible"),
        what="an infeasible re-plan",
        timeout=20,
    )
    planned = next(c for c in st["conditions"] if c["type"] == "Planned")
    assert planned["status"] == "False" and planned["reason"] == "InsufficientMemory"
    assert st["replan"]["lastCause"].startswith(f"node {gone} removed: ")
    event = wait.event(lab.client, lab.namespace, involved="chat", reason="ReplanInfeasible")
    assert event.type == "Warning" and gone in event.message


def test_a_switch_never_leaves_the_service_without_a_ready_endpoint(lab, operator) -> None:
    # twice SMALL: the new plan's stages come up next to the serving ones on the two nodes
    # left, and the scheduler counts both plans' memory requests until the switch
    for i in range(3):
        lab.add_node(f"e{i}", **{**SMALL, "memory": "96Mi"})
    lab.apply_pipeline("chat", replan={"debounceSeconds": 30, "drainSeconds": 6}, workload=WORKLOAD)
    first = lab.wait_ready("chat")
    stage0 = lab.planned_nodes(first)[0]
    wait.until(lambda: lab.ready_endpoints("chat") > 0, what="a ready endpoint", timeout=30)

    with EndpointWatch(lab, "chat", interval=0.1).running() as watch:
        time.sleep(0.5)  # a few polls before the switch begins
        cordoned_at = time.monotonic()
        lab.plane.cordon(stage0)  # urgent: re-planned at once despite the 30 s window
        st = lab.wait_status("chat", new_plan_serving(first["planHash"]), what="the switch")
        # the old plan drains (spec.replan.drainSeconds) before its objects go
        lab.wait_status(
            "chat",
            lambda s: first["planHash"] in (s.get("drainingPlans") or {}),
            what="the old plan draining",
            timeout=30,
        )
        assert lab.stage_pods("chat", first["planHash"]), "deleted before its drain"
        event = wait.event(lab.client, lab.namespace, involved="chat", reason="Draining")
        assert first["planHash"] in event.message
        wait.until(
            lambda: not lab.stage_pods("chat", first["planHash"]),
            what="the old plan's pods to be gone",
            timeout=60,
        )
        wait.event(lab.client, lab.namespace, involved="chat", reason="Drained")
        done_at = time.monotonic()
        time.sleep(1.0)  # a few more polls after the old stage 0 went away

    times = [t for t, _ in watch.samples]
    steps = [later - earlier for earlier, later in itertools.pairwise(times)]
    print(
        f"\n{len(times)} endpoint polls over {times[-1] - times[0]:.1f} s through the switch, "
        f"longest step between polls {max(steps):.2f} s"
    )
    assert times[0] < cordoned_at and times[-1] > done_at  # the whole switch is covered
    assert max(steps) < 1.0  # no stretch went unobserved
    assert watch.gaps() == [], f"no ready endpoint at {watch.gaps()} s"
    assert stage0 not in lab.planned_nodes(st)
    assert st["replan"]["lastCause"].startswith(f"node {stage0} cordoned: 3 stages -> 2")


def test_a_flapping_label_replans_at_most_once_per_window(lab, operator) -> None:
    window = 3.0
    lab.add_node("fast", memory_bandwidth_gbps=100, **ROOMY)
    flappy = lab.add_node("flappy", memory_bandwidth_gbps=50, **ROOMY)
    lab.apply_pipeline("chat", placement={"maxStages": 1}, replan={"debounceSeconds": window})
    first = lab.wait_ready("chat")

    replans: list[float] = []
    seen = 0
    start = time.monotonic()
    flapping_for = 7.5
    i = 0
    while time.monotonic() - start < flapping_for + window + 3:
        now = time.monotonic() - start
        if now < flapping_for and now >= i * 0.25:
            lab.label_node(flappy, "llmpipe.io/memory-bandwidth-gbps", "60" if i % 2 else "50")
            i += 1
        count = int((lab.status("chat").get("replan") or {}).get("count") or 0)
        if count > seen:
            replans.extend([now] * (count - seen))
            seen = count
        time.sleep(0.1)

    print(f"\n{i} label flips in {flapping_for}s, re-plans at {[round(t, 1) for t in replans]}s")
    assert i >= 25
    assert 1 <= len(replans) <= math.ceil(flapping_for / window) + 1
    for earlier, later in itertools.pairwise(replans):
        assert later - earlier >= window - 0.5  # status is polled every 0.1 s
    st = lab.status("chat")
    assert st["planHash"] == first["planHash"]  # the slower node never wins
    assert st["replan"]["lastDecision"].startswith("unchanged")
    assert (
        f"node {flappy} labels changed (llmpipe.io/memory-bandwidth-gbps)"
        in (st["replan"]["lastCause"])
    )


def test_a_better_node_causes_a_switch_only_above_the_margin(lab, operator) -> None:
    base = lab.add_node("base", memory_bandwidth_gbps=100, **ROOMY)
    lab.apply_pipeline(
        "chat",
        placement={"maxStages": 1},
        replan={"debounceSeconds": 1, "improvementMargin": 0.2},
    )
    first = lab.wait_ready("chat")
    assert lab.planned_nodes(first) == [base]

    slightly = lab.add_node("slightly", memory_bandwidth_gbps=110, **ROOMY)  # 9% better
    st = lab.wait_status(
        "chat",
        lambda s: slightly in (s.get("replan") or {}).get("lastCause", ""),
        what=f"a re-plan for {slightly}",
    )
    assert st["planHash"] == first["planHash"]
    assert st["replan"]["lastDecision"].startswith("kept: improves the objective by 9.1%")
    assert "below the margin of 20%" in st["replan"]["lastDecision"]
    skipped = wait.event(lab.client, lab.namespace, involved="chat", reason="ReplanSkipped")
    assert skipped.message.startswith(
        f"node {slightly} added: 1 stages -> 1, bottleneck 487 µs -> 442 µs"
    )

    with EndpointWatch(lab, "chat", interval=0.1).running() as watch:
        much = lab.add_node("much", memory_bandwidth_gbps=200, **ROOMY)  # 50% better
        st = lab.wait_status("chat", new_plan_serving(first["planHash"]), what="a switch")
    assert lab.planned_nodes(st) == [much]
    assert st["replan"]["lastDecision"].startswith("switched: improves the objective by 49.9%")
    lab.wait_pods_running("chat", st)
    assert watch.gaps() == [], f"no ready endpoint at {watch.gaps()} s"


def test_a_switch_past_its_timeout_keeps_the_old_plan_serving(lab, operator) -> None:
    base = lab.add_node("base", memory_bandwidth_gbps=100, **ROOMY)
    lab.apply_pipeline(
        "chat",
        placement={"maxStages": 1},
        replan={"debounceSeconds": 1, "switchTimeoutSeconds": 4},
    )
    first = lab.wait_ready("chat")
    # faster, but the scheduler can place no pod on it: the new stage stays Pending
    full = lab.add_node("full", memory_bandwidth_gbps=300, pods=0, **ROOMY)

    st = lab.wait_status(
        "chat",
        lambda s: s.get("phase") == "Degraded" and s.get("planHash") != first["planHash"],
        what="Degraded after the switch timeout",
        timeout=60,
    )
    assert st["servingPlanHash"] == first["planHash"]
    degraded = next(c for c in st["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "SwitchTimedOut"
    assert "switchTimeoutSeconds=4" in degraded["message"]
    assert f"plan {first['planHash']} keeps serving" in degraded["message"]
    assert "s0:" in degraded["message"]
    assert lab.planned_nodes(st) == [full]
    assert lab.ready_endpoints("chat") == 1  # the old stage 0 on `base` still serves
    assert [p.spec.nodeName for p in lab.stage_pods("chat", first["planHash"])] == [base]
    event = wait.event(lab.client, lab.namespace, involved="chat", reason="SwitchTimedOut")
    assert event.message == degraded["message"]


@pytest.mark.parametrize("_", [None], ids=["kwok-cluster"])
async def test_node_metrics_absent_is_a_note_not_an_error(control_plane, _) -> None:
    client = AsyncClient(KubeConfig.from_file(control_plane.kubeconfig))
    try:
        usage = await metrics_api.read_node_usage(client)
    finally:
        await client.close()
    assert usage.served is False and usage.memory_bytes == {}
    assert usage.note.startswith("metrics.k8s.io is not served")
