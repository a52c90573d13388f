"""Fluent builders for the Node objects and plans the re-planning tests feed in."""

from __future__ import annotations

import copy
from typing import Any


class NodeBuilder:
    """`a_node("orin-b").memory("8Gi").label("llmpipe.io/tier", "edge").build()`"""

    def __init__(self, name: str) -> None:
        self._node: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": {}, "annotations": {}},
            "spec": {},
            "status": {
                "allocatable": {"memory": "8Gi", "cpu": "4"},
                "conditions": [
                    {"type": "MemoryPressure", "status": "False"},
                    {"type": "Ready", "status": "True", "lastHeartbeatTime": "t0"},
                ],
            },
        }

    def memory(self, quantity: str) -> NodeBuilder:
        self._node["status"]["allocatable"]["memory"] = quantity
        return self

    def label(self, key: str, value: str) -> NodeBuilder:
        self._node["metadata"]["labels"][key] = value
        return self

    def annotation(self, key: str, value: str) -> NodeBuilder:
        self._node["metadata"]["annotations"][key] = value
        return self

    def not_ready(self) -> NodeBuilder:
        self._ready_condition()["status"] = "False"
        return self

    def heartbeat(self, at: str) -> NodeBuilder:
        self._ready_condition()["lastHeartbeatTime"] = at
        return self

    def cordoned(self) -> NodeBuilder:
        self._node["spec"]["unschedulable"] = True
        return self

    def taint(self, key: str, effect: str = "NoSchedule", value: str = "") -> NodeBuilder:
        self._node["spec"].setdefault("taints", []).append(
            {"key": key, "value": value, "effect": effect}
        )
        return self

    def _ready_condition(self) -> dict[str, Any]:
        return next(c for c in self._node["status"]["conditions"] if c["type"] == "Ready")

    def build(self) -> dict[str, Any]:
        return copy.deepcopy(self._node)


def a_node(name: str) -> NodeBuilder:
    return NodeBuilder(name)


def a_plan(
    *stages: tuple[str, int, int],
    objective: str = "throughput",
    bottleneck: float = 0.02,
    latency: float = 0.1,
    memory: int = 2 << 30,
) -> dict[str, Any]:
    """A plan JSON of docs/design.md with one stage per (node, layerStart, layerEnd)."""
    last = len(stages) - 1
    return {
        "objective": objective,
        "bottleneckSeconds": bottleneck,
        "tokenLatencySeconds": latency,
        "estTokensPerSecond": 8 / bottleneck,
        "stages": [
            {
                "index": i,
                "node": node,
                "layerStart": start,
                "layerEnd": end,
                "hasEmbedding": i == 0,
                "hasHead": i == last,
                "memoryBytes": memory,
                "computeSeconds": bottleneck,
                "transferSeconds": 0.0,
            }
            for i, (node, start, end) in enumerate(stages)
        ],
    }
