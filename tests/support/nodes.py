"""Simulated nodes: a cluster file (docs/design.md format) -> Kubernetes Node manifests.

Pure: takes data, returns data; no API calls (tests/support/control_plane.py applies them).
Every node is marked for kwok (annotation `kwok.x-k8s.io/node: fake`), carries the llmpipe
labels the operator reads (tier, tflops, memory bandwidth, uplink), the K3s-style
`node-role.kubernetes.io/edge` label on edge nodes, CPU/memory/pods capacity and
allocatable, and the `llmpipe.io/links` annotation built from the file's `links`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

KWOK_ANNOTATION = "kwok.x-k8s.io/node"
LINKS_ANNOTATION = "llmpipe.io/links"
#: Label that makes our kwok stages hold a node at Ready=False (see tests/support/kwok.yaml).
NOT_READY_LABEL = "test.llmpipe.io/not-ready"
#: Label the kubelet of every real node sets (tests/support/real_nodes.py); kwok nodes lack it.
REAL_NODE_LABEL = "test.llmpipe.io/real-node"
TIERS = ("edge", "cloud")


class ClusterFileError(ValueError):
    """A cluster file that cannot describe simulated nodes; the message names node and field."""


@dataclass(frozen=True)
class NodeSpec:
    """One simulated node, as a cluster file describes it."""

    name: str
    tier: str = "cloud"
    memory: str = "16Gi"
    """Kubernetes quantity, used for both capacity and allocatable memory."""
    tflops: float = 10.0
    memory_bandwidth_gbps: float = 100.0
    uplink_mbps: float = 1000.0
    cpu: str = ""
    """Cluster files carry no CPU; empty means 4 cores on edge nodes and 16 on cloud nodes,
    enough that CPU requests never decide placement (the planner places by memory)."""
    pods: int = 110
    labels: Mapping[str, str] = field(default_factory=dict)
    links: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    """Peer node name -> {"mbps": ..., "rttMs": ...}: the `llmpipe.io/links` annotation."""


def _number(raw: Mapping[str, Any], key: str, node: str, default: float) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ClusterFileError(f"node {node!r}: {key} must be a positive number, got {value!r}")
    return float(value)


def _memory(raw: Mapping[str, Any], node: str) -> str:
    value = raw.get("memory")
    if isinstance(value, bool) or not isinstance(value, int | str) or value in ("", 0):
        raise ClusterFileError(
            f"node {node!r}: memory must be a Kubernetes quantity or a byte count, got {value!r}"
        )
    return str(value)


def parse_node(raw: Mapping[str, Any]) -> NodeSpec:
    """One entry of the file's `nodes` list -> NodeSpec (links are added by parse_cluster)."""
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ClusterFileError(f"every node needs a non-empty name, got {raw!r}")
    tier = raw.get("tier", "cloud")
    if tier not in TIERS:
        raise ClusterFileError(f"node {name!r}: tier must be one of {TIERS}, got {tier!r}")
    labels = raw.get("labels") or {}
    if not isinstance(labels, Mapping):
        raise ClusterFileError(f"node {name!r}: labels must be a mapping, got {labels!r}")
    return NodeSpec(
        name=name,
        tier=tier,
        memory=_memory(raw, name),
        tflops=_number(raw, "tflops", name, 10.0),
        memory_bandwidth_gbps=_number(raw, "memoryBandwidthGBps", name, 100.0),
        uplink_mbps=_number(raw, "uplinkMbps", name, 1000.0),
        labels={str(k): str(v) for k, v in labels.items()},
    )


def parse_cluster(data: Mapping[str, Any]) -> list[NodeSpec]:
    """A whole cluster file -> NodeSpecs, each with the links that touch it (symmetric)."""
    raw_nodes = data.get("nodes")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise ClusterFileError("a cluster file needs a non-empty `nodes` list")
    specs = [parse_node(raw) for raw in raw_nodes]
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ClusterFileError(f"node names must be unique, got {names}")
    links: dict[str, dict[str, dict[str, float]]] = {name: {} for name in names}
    for link in data.get("links") or []:
        a, b = link.get("a"), link.get("b")
        if a not in links or b not in links or a == b:
            raise ClusterFileError(f"link {link!r}: a and b must name two different nodes")
        facts = {k: float(link[k]) for k in ("mbps", "rttMs") if k in link}
        links[a][b] = facts
        links[b][a] = facts
    return [NodeSpec(**{**spec.__dict__, "links": links[spec.name]}) for spec in specs]


def _format_number(value: float) -> str:
    return str(int(value)) if value == int(value) else repr(value)


def node_labels(spec: NodeSpec) -> dict[str, str]:
    labels = {
        "kubernetes.io/hostname": spec.name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "type": "kwok",
        "llmpipe.io/tier": spec.tier,
        "llmpipe.io/tflops": _format_number(spec.tflops),
        "llmpipe.io/memory-bandwidth-gbps": _format_number(spec.memory_bandwidth_gbps),
        "llmpipe.io/uplink-mbps": _format_number(spec.uplink_mbps),
    }
    if spec.tier == "edge":
        labels["node-role.kubernetes.io/edge"] = "true"
    labels.update(spec.labels)
    return labels


GPU_COUNT_LABEL = "nvidia.com/gpu.count"


def node_resources(spec: NodeSpec) -> dict[str, str]:
    """Capacity = allocatable; a node with GPU Feature Discovery's count label also gets
    the NVIDIA device plugin's `nvidia.com/gpu`, as on a real GPU node."""
    cpu = spec.cpu or ("4" if spec.tier == "edge" else "16")
    resources = {"cpu": cpu, "memory": spec.memory, "pods": str(spec.pods)}
    if GPU_COUNT_LABEL in spec.labels:
        resources["nvidia.com/gpu"] = spec.labels[GPU_COUNT_LABEL]
    return resources


def node_manifest(spec: NodeSpec) -> dict[str, Any]:
    """The Node object a kubelet would register, marked so that kwok manages it."""
    annotations = {KWOK_ANNOTATION: "fake"}
    if spec.links:
        annotations[LINKS_ANNOTATION] = json.dumps(spec.links, sort_keys=True)
    resources = node_resources(spec)
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": spec.name, "labels": node_labels(spec), "annotations": annotations},
        "spec": {},
        "status": {"capacity": dict(resources), "allocatable": dict(resources)},
    }
