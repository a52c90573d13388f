"""Live inventory: Node objects -> the planner's Inventory, with reasons for left-out nodes.

Covers: labels to tier/TFLOP/s/bandwidth/uplink (and defaults), allocatable memory minus
metrics usage, the links annotation (slower end wins, malformed = note), and eligibility:
Ready, cordoned, nodeSelector, excludeNodes, NoSchedule/NoExecute taints vs tolerations.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from llmpipe_operator import spec as spec_mod
from llmpipe_operator.planning import live


class NodeBuilder:
    def __init__(self, name: str) -> None:
        self.obj: dict[str, Any] = {
            "metadata": {"name": name, "labels": {}, "annotations": {}},
            "spec": {},
            "status": {
                "allocatable": {"memory": "8Gi"},
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }

    def label(self, key: str, value: str) -> NodeBuilder:
        self.obj["metadata"]["labels"][key] = value
        return self

    def edge(self) -> NodeBuilder:
        return self.label(live.LABEL_TIER, "edge")

    def memory(self, quantity: str) -> NodeBuilder:
        self.obj["status"]["allocatable"]["memory"] = quantity
        return self

    def links(self, **peers: dict) -> NodeBuilder:
        self.obj["metadata"]["annotations"][live.ANNOTATION_LINKS] = json.dumps(peers)
        return self

    def not_ready(self) -> NodeBuilder:
        self.obj["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
        return self

    def cordoned(self) -> NodeBuilder:
        self.obj["spec"]["unschedulable"] = True
        return self

    def taint(self, key: str, effect: str = "NoSchedule") -> NodeBuilder:
        self.obj["spec"].setdefault("taints", []).append({"key": key, "effect": effect})
        return self


def a_node(name: str) -> NodeBuilder:
    return NodeBuilder(name)


def build(nodes: list[NodeBuilder], **eligibility: Any) -> live.LiveInventory:
    tolerations = eligibility.pop("tolerations", ())
    rules = live.Eligibility(
        tolerates=lambda t: any(x.tolerates(t) for x in tolerations), **eligibility
    )
    return live.build_inventory([n.obj for n in nodes], eligibility=rules)


def test_labels_and_allocatable_memory_become_planner_nodes() -> None:
    nodes = [
        a_node("orin")
        .edge()
        .memory("16Gi")
        .label(live.LABEL_TFLOPS, "5.3")
        .label(live.LABEL_BANDWIDTH, "204")
        .label(live.LABEL_UPLINK, "940"),
        a_node("plain"),
    ]
    result = live.build_inventory(
        [n.obj for n in nodes], eligibility=live.Eligibility(), memory_usage={"orin": 2 * 2**30}
    )
    orin, plain = result.inventory.node("orin"), result.inventory.node("plain")
    assert (orin.tier, orin.tflops, orin.memory_bandwidth_gbps, orin.uplink_mbps) == (
        "edge",
        5.3,
        204.0,
        940.0,
    )
    assert orin.memory_bytes == 14 * 2**30  # allocatable minus metrics usage
    defaults = live.NodeDefaults()
    assert (plain.tier, plain.tflops, plain.uplink_mbps) == (
        "cloud",
        defaults.tflops,
        defaults.uplink_mbps,
    )
    assert plain.memory_bytes == 8 * 2**30
    assert result.excluded == {}


def test_links_annotation_between_eligible_nodes_slower_end_wins() -> None:
    nodes = [
        a_node("a").links(b={"mbps": 100, "rttMs": 3}, gone={"mbps": 5, "rttMs": 1}),
        a_node("b").links(a={"mbps": 40, "rttMs": 5}),
        a_node("c").links(a="not an object"),  # malformed: a note, node still eligible
    ]
    result = build(nodes)
    link = result.inventory.link("a", "b")
    assert (link.mbps, link.rtt_ms) == (40.0, 5.0)
    assert result.inventory.mbps("a", "c") == 1000.0  # default uplinks
    assert len(result.notes) == 1 and "node 'c'" in result.notes[0]
    assert set(n.name for n in result.inventory.nodes) == {"a", "b", "c"}


eligibility_cases = pytest.mark.parametrize(
    "node, rules, reason",
    [
        (a_node("n").not_ready(), {}, "not Ready"),
        (a_node("n").cordoned(), {}, "cordoned"),
        (a_node("n"), {"node_selector": {"pool": "llm"}}, "does not match nodeSelector"),
        (a_node("n"), {"exclude_nodes": frozenset({"n"})}, "excludeNodes"),
        (a_node("n").taint("gpu"), {}, "taint gpu:NoSchedule not tolerated"),
        (a_node("n").taint("gpu", "NoExecute"), {}, "not tolerated"),
        (a_node("n").label(live.LABEL_TFLOPS, "fast"), {}, "must be a positive number"),
        (a_node("n").memory("lots"), {}, "allocatable.memory"),
    ],
    ids=[
        "not-ready",
        "cordoned",
        "selector",
        "excluded",
        "taint",
        "noexecute",
        "bad-label",
        "bad-memory",
    ],
)


@eligibility_cases
def test_ineligible_nodes_are_left_out_with_a_reason(node, rules, reason) -> None:
    result = build([node, a_node("ok").label("pool", "llm")], **rules)
    assert [n.name for n in result.inventory.nodes] == ["ok"]
    assert reason in result.excluded["n"]


def test_tolerated_taints_and_prefer_no_schedule_keep_a_node() -> None:
    nodes = [
        a_node("gpu").taint("gpu"),
        a_node("soft").taint("x", "PreferNoSchedule"),
        a_node("pool").label("pool", "llm"),
    ]
    result = build(nodes, tolerations=(spec_mod.Toleration("gpu", "Exists"),))
    assert {n.name for n in result.inventory.nodes} == {"gpu", "soft", "pool"}


# --- memory others hold: pods' requests and other pipelines' planned stages --------------

MiB = 2**20


def a_pod(
    name: str,
    *,
    node: str | None = None,
    pinned: str | None = None,
    memory: str | None = "100Mi",
    pipeline: tuple[str, str, str, int] | None = None,
    namespace: str = "default",
    phase: str = "Running",
    init: str | None = None,
) -> dict[str, Any]:
    labels = {}
    if pipeline is not None:
        namespace = pipeline[0]
        labels = {
            live.POD_LABEL_PIPELINE: pipeline[1],
            live.POD_LABEL_PLAN_HASH: pipeline[2],
            live.POD_LABEL_STAGE_INDEX: str(pipeline[3]),
        }
    spec: dict[str, Any] = {
        "containers": [
            {"name": "c", "resources": {"requests": {"memory": memory}} if memory else {}}
        ]
    }
    if node:
        spec["nodeName"] = node
    if pinned:
        term = {
            "matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "In", "values": [pinned]}
            ]
        }
        spec["affinity"] = {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}
            }
        }
    if init:
        spec["initContainers"] = [{"name": "i", "resources": {"requests": {"memory": init}}}]
    return {
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": spec,
        "status": {"phase": phase},
    }


def test_requests_of_bound_and_pinned_pods_count_but_not_our_own_or_finished_ones() -> None:
    pods = [
        a_pod("dns", node="n1", memory="70Mi", namespace="kube-system"),
        a_pod("other-s0", node="n1", memory="200Mi", pipeline=("team-b", "other", "h1", 0)),
        a_pod("other-s1", pinned="n2", memory="300Mi", pipeline=("team-b", "other", "h1", 1)),
        a_pod("mine", node="n1", memory="1Gi", pipeline=("team-a", "chat", "h9", 0)),
        a_pod("job", node="n2", memory="5Gi", phase="Succeeded"),
        a_pod("nowhere", memory="5Gi"),  # neither bound nor pinned: no node to charge
        a_pod("besteffort", node="n2", memory=None),
    ]
    held = live.held_memory(pods, pipeline=("team-a", "chat"), reservations={})
    assert held.total == {"n1": 270 * MiB, "n2": 300 * MiB}
    assert held.holders["n1"] == {
        "pod kube-system/dns": 70 * MiB,
        "pipeline team-b/other": 200 * MiB,
    }
    assert held.describe(["n1", "n2"]) == (
        "pipeline team-b/other 500 MiB on 2 nodes, pod kube-system/dns 70 MiB on n1"
    )
    assert held.describe(["n2"]) == "pipeline team-b/other 300 MiB on n2"


def test_a_pod_request_is_the_larger_of_its_containers_and_its_init_container() -> None:
    assert live.pod_memory_request(a_pod("p", node="n", memory="100Mi", init="300Mi")) == 300 * MiB
    assert live.pod_memory_request(a_pod("p", node="n", memory="400Mi", init="300Mi")) == 400 * MiB


def test_reserved_stages_count_until_their_pod_exists_and_never_twice() -> None:
    reservations = {
        ("team-b", "other"): live.Reservation(
            digest="h2", stages={0: ("n1", 500 * MiB), 1: ("n2", 600 * MiB)}
        ),
        ("team-a", "chat"): live.Reservation(digest="h9", stages={0: ("n1", 4 * 2**30)}),
    }
    # stage 0 of other's new plan exists already (pinned, Pending); stage 1 not yet
    pods = [a_pod("other-s0", pinned="n1", memory="500Mi", pipeline=("team-b", "other", "h2", 0))]
    held = live.held_memory(pods, pipeline=("team-a", "chat"), reservations=reservations)
    assert held.total == {"n1": 500 * MiB, "n2": 600 * MiB}  # our own reservation is ours


def test_held_memory_is_taken_off_allocatable_and_a_full_node_is_told_apart() -> None:
    nodes = [a_node("small").memory("1Gi"), a_node("full").memory("1Gi")]
    result = live.build_inventory(
        [n.obj for n in nodes],
        eligibility=live.Eligibility(),
        memory_usage={"small": 400 * MiB, "full": 2**30},
    )
    assert result.inventory.node("small").memory_bytes == 624 * MiB
    assert result.full == frozenset({"full"})
    assert result.excluded["full"] == "no free memory (1.0 GiB held of 1.0 GiB)"


def test_stage_pod_labels_match_the_manifests() -> None:
    from llmpipe_operator.manifests import names

    assert (live.POD_LABEL_PIPELINE, live.POD_LABEL_PLAN_HASH, live.POD_LABEL_STAGE_INDEX) == (
        names.LABEL_PIPELINE,
        names.LABEL_PLAN_HASH,
        names.LABEL_STAGE_INDEX,
    )


def test_stage_pods_rendered_by_the_operator_are_charged_to_their_node() -> None:
    from llmpipe_operator.manifests import stages
    from tests.unit.manifests.builders import REF, a_plan, a_spec

    spec = a_spec().build()
    plan = a_plan(spec)
    pods = []
    for stage in plan["stages"]:
        template = stages.build_stage_deployment(REF, spec, stage, digest="d1")["spec"]["template"]
        pods.append({"metadata": {**template["metadata"], "namespace": REF.namespace}, **template})
    held = live.held_memory(pods, pipeline=("elsewhere", "x"), reservations={})
    expected: dict[str, int] = {}
    for stage in plan["stages"]:
        expected[stage["node"]] = expected.get(stage["node"], 0) + stage["memoryBytes"]
    assert held.total == expected


def test_beside_a_new_plan_our_running_stages_count_as_held() -> None:
    pods = [
        a_pod("old-s0", node="n1", memory="600Mi", pipeline=("team-a", "chat", "old", 0)),
        a_pod("new-s0", pinned="n1", memory="300Mi", pipeline=("team-a", "chat", "new", 0)),
    ]
    mine = ("team-a", "chat")
    assert live.held_memory(pods, pipeline=mine, reservations={}).total == {}
    beside = live.held_memory(pods, pipeline=mine, reservations={}, beside="new")
    assert beside.total == {"n1": 600 * MiB}  # the old plan serves until the switch
    assert beside.describe(["n1"]) == "pipeline team-a/chat (its running plan old) 600 MiB on n1"
    assert live.own_plans(pods, pipeline=mine) == {"old", "new"}


def test_a_second_pipeline_plans_on_what_the_first_left_and_never_overcommits() -> None:
    """The pure path of a reconcile: pods -> held memory -> inventory -> plan."""
    from llmpipe_operator.manifests import stages
    from llmpipe_operator.planning import planner
    from tests.unit.manifests.builders import REF, a_spec

    spec = a_spec().build()
    profile = spec.profile()
    workload = planner.Workload(runtime_overhead_bytes=spec.runtime.runtime_overhead_bytes)
    nodes = [a_node(f"n{i}").memory("700Mi").obj for i in range(3)]
    pods: list[dict[str, Any]] = []
    planned = []
    for number in range(8):
        me = (REF.namespace, f"p{number}")
        held = live.held_memory(pods, pipeline=me, reservations={})
        usage = dict(held.total)
        offered = live.build_inventory(nodes, eligibility=live.Eligibility(), memory_usage=usage)
        try:
            plan = planner.plan_pipeline(profile, offered.inventory, workload=workload).to_dict()
        except planner.PlanInfeasible:
            assert held.total, "refused only when others hold memory"
            continue
        planned.append(number)
        ref = dataclasses.replace(REF, name=f"p{number}")
        for stage in plan["stages"]:
            template = stages.build_stage_deployment(ref, spec, stage, digest="d")["spec"][
                "template"
            ]
            pods.append(
                {**template, "metadata": {**template["metadata"], "namespace": REF.namespace}}
            )
    assert 0 < len(planned) < 8
    final = live.held_memory(pods, pipeline=("nobody", "x"), reservations={})
    for node in nodes:
        assert final.total.get(node["metadata"]["name"], 0) <= 700 * MiB


def test_a_measured_time_factor_divides_the_nodes_figures_and_only_its_own() -> None:
    slow = (
        a_node("slow")
        .edge()
        .label("llmpipe.io/tflops", "4")
        .label("llmpipe.io/memory-bandwidth-gbps", "100")
    )
    other = a_node("other").edge().label("llmpipe.io/tflops", "4")
    rules = live.Eligibility(tolerates=lambda t: False)
    plain = live.build_inventory([slow.obj, other.obj], eligibility=rules)
    factored = live.build_inventory(
        [slow.obj, other.obj],
        eligibility=rules,
        time_factors={"slow": 2.0, "gone": 3.0, "other": 1.0},
    )
    before = {n.name: n for n in plain.inventory.nodes}
    after = {n.name: n for n in factored.inventory.nodes}
    assert after["slow"].tflops == 2.0 and after["slow"].memory_bandwidth_gbps == 50.0
    assert after["other"] == before["other"]
    assert slow.obj["metadata"]["labels"]["llmpipe.io/tflops"] == "4"  # labels untouched
    assert factored.time_factors == {"slow": 2.0}  # only eligible nodes with a factor != 1
    assert plain.time_factors == {}
