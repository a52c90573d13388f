"""Live inventory: Node objects -> the planner's Inventory, with reasons for left-out nodes.

Covers: labels to tier/TFLOP/s/bandwidth/uplink (and defaults), allocatable memory minus
metrics usage, the links annotation (slower end wins, malformed = note), and eligibility:
Ready, cordoned, nodeSelector, excludeNodes, NoSchedule/NoExecute taints vs tolerations.
"""

from __future__ import annotations

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
