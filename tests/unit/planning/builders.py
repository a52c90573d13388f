"""Fluent builders for planning test objects: `a_node("jetson").edge().memory("8Gi")`."""

from __future__ import annotations

import dataclasses
from typing import Any

from llmpipe_operator.planning import inventory, profiles

GiB = 2**30
MiB = 2**20


@dataclasses.dataclass
class NodeBuilder:
    name: str
    fields: dict[str, Any] = dataclasses.field(
        default_factory=lambda: {
            "tier": "edge",
            "memory": "8Gi",
            "tflops": 1.0,
            "memoryBandwidthGBps": 50.0,
            "uplinkMbps": 1000.0,
        }
    )

    def edge(self) -> NodeBuilder:
        return self._with(tier="edge")

    def cloud(self) -> NodeBuilder:
        return self._with(tier="cloud")

    def memory(self, quantity: str | int) -> NodeBuilder:
        return self._with(memory=quantity)

    def tflops(self, value: float) -> NodeBuilder:
        return self._with(tflops=value)

    def bandwidth(self, gbps: float) -> NodeBuilder:
        return self._with(memoryBandwidthGBps=gbps)

    def uplink(self, mbps: float) -> NodeBuilder:
        return self._with(uplinkMbps=mbps)

    def gpu(
        self, product: str = "NVIDIA-L4", *, memory_mib: int | None = 24576, count: int = 1
    ) -> NodeBuilder:
        """GPU Feature Discovery's labels; the node's compute and bandwidth fields are
        dropped, so the GPU's come from the product table (and the CPU's are the defaults)."""
        labels = {"nvidia.com/gpu.count": str(count), "nvidia.com/gpu.product": product}
        if memory_mib is not None:
            labels["nvidia.com/gpu.memory"] = str(memory_mib)
        speeds = ("tflops", "memoryBandwidthGBps")
        fields = {k: v for k, v in self.fields.items() if k not in speeds}
        return NodeBuilder(self.name, {**fields, "labels": {**self.labels, **labels}})

    def timings(
        self,
        *,
        layer: float = 0.0,
        token: float = 0.0,
        step: float = 0.0,
        hop: float = 0.0,
        products: dict[str, float] | None = None,
    ) -> NodeBuilder:
        """Fixed costs as the cluster file states them (0: none; see cost.default_timings
        for a node without them)."""
        fields = {
            "layerStepSeconds": layer,
            "layerTokenSeconds": token,
            "stepSeconds": step,
            "hopSeconds": hop,
        }
        if products is not None:
            fields["productSecondsPerByte"] = products
        return self._with(**fields)

    def no_fixed_costs(self) -> NodeBuilder:
        return self.timings()

    def label(self, key: str, value: str) -> NodeBuilder:
        return self._with(labels={**self.labels, key: value})

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.fields.get("labels") or {})

    def _with(self, **changes: Any) -> NodeBuilder:
        return NodeBuilder(self.name, {**self.fields, **changes})

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.fields}

    def build(self) -> inventory.Node:
        return inventory.parse_cluster({"nodes": [self.as_dict()]}).nodes[0]


def a_node(name: str) -> NodeBuilder:
    return NodeBuilder(name)


@dataclasses.dataclass
class ClusterBuilder:
    nodes: list[NodeBuilder]
    links: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    rtt: dict[str, float] = dataclasses.field(default_factory=dict)

    def link(self, a: str, b: str, *, mbps: float, rtt_ms: float) -> ClusterBuilder:
        link = {"a": a, "b": b, "mbps": mbps, "rttMs": rtt_ms}
        return ClusterBuilder(self.nodes, [*self.links, link], self.rtt)

    def rtt_ms(self, **pairs: float) -> ClusterBuilder:
        named = {key.replace("_", "-"): value for key, value in pairs.items()}
        return ClusterBuilder(self.nodes, self.links, {**self.rtt, **named})

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"nodes": [n.as_dict() for n in self.nodes]}
        if self.links:
            data["links"] = self.links
        if self.rtt:
            data["rttMs"] = self.rtt
        return data

    def build(self) -> inventory.Inventory:
        return inventory.parse_cluster(self.as_dict())


def a_cluster(*nodes: NodeBuilder) -> ClusterBuilder:
    return ClusterBuilder(list(nodes))


@dataclasses.dataclass
class ProfileBuilder:
    fields: dict[str, Any]

    def layers(self, *sizes: int) -> ProfileBuilder:
        return self._with(layer_bytes=tuple(sizes), num_layers=len(sizes))

    def embed(self, size: int) -> ProfileBuilder:
        return self._with(embed_bytes=size)

    def head(self, size: int) -> ProfileBuilder:
        return self._with(head_bytes=size)

    def kv_per_token_per_layer(self, size: int) -> ProfileBuilder:
        return self._with(kv_bytes_per_token_per_layer=size)

    def hidden(self, size: int) -> ProfileBuilder:
        return self._with(hidden_size=size)

    def _with(self, **changes: Any) -> ProfileBuilder:
        return ProfileBuilder({**self.fields, **changes})

    def build(self) -> profiles.ModelProfile:
        return profiles.ModelProfile(**self.fields)


def a_profile(layers: int = 4, *, layer_size: int = 256 * MiB) -> ProfileBuilder:
    return ProfileBuilder(
        {
            "name": "test-model",
            "num_layers": layers,
            "hidden_size": 2048,
            "layer_bytes": (layer_size,) * layers,
            "embed_bytes": 128 * MiB,
            "head_bytes": 128 * MiB,
            "kv_bytes_per_token_per_layer": 1024,
            "activation_bytes": 2,
            "weight_bytes_per_param": 2,
        }
    )
