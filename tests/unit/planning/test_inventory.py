"""The cluster file: Kubernetes quantities, defaults (RTT by tier pair, min of uplinks),
link overrides, and errors that name the node and the field."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmpipe_operator.planning import inventory

from .builders import a_cluster, a_node


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8Gi", 8 * 2**30),
        ("512Mi", 512 * 2**20),
        ("1.5Gi", 3 * 2**29),
        ("1Ki", 1024),
        ("2Ti", 2 * 2**40),
        ("1G", 10**9),
        ("500M", 5 * 10**8),
        ("1k", 1000),
        ("4096", 4096),
        ("1e9", 10**9),
        ("2.5E3", 2500),
        ("1500m", 1),  # milli-bytes round down
        (" 3Mi ", 3 * 2**20),
        (4096, 4096),
        (1.9, 1),
    ],
)
def test_parse_quantity(text: str | int | float, expected: int) -> None:
    assert inventory.parse_quantity(text) == expected


@pytest.mark.parametrize("text", ["", "8GB", "Gi", "eight", "8 Gi Gi", "1..5", True, float("nan")])
def test_parse_quantity_refuses_nonsense(text: Any) -> None:
    with pytest.raises(ValueError):
        inventory.parse_quantity(text)


@given(st.integers(0, 2**50), st.sampled_from(["Ki", "Mi", "Gi"]))
def test_binary_suffixes_scale_exactly(number: int, suffix: str) -> None:
    scale = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}[suffix]
    assert inventory.parse_quantity(f"{number}{suffix}") == number * scale


def test_a_full_file_parses() -> None:
    cluster = inventory.parse_cluster(
        {
            "nodes": [
                {
                    "name": "jetson-1",
                    "tier": "edge",
                    "memory": "8Gi",
                    "tflops": 1.3,
                    "memoryBandwidthGBps": 60,
                    "uplinkMbps": 100,
                    "labels": {"zone": "a", "n": 1},
                },
                {
                    "name": "gpu-1",
                    "tier": "cloud",
                    "memory": 25769803776,
                    "tflops": 80,
                    "memoryBandwidthGBps": 900,
                    "uplinkMbps": 10000,
                },
                {
                    "name": "gpu-2",
                    "tier": "cloud",
                    "memory": "24Gi",
                    "tflops": 80,
                    "memoryBandwidthGBps": 900,
                    "uplinkMbps": 10000,
                },
            ],
            "links": [{"a": "jetson-1", "b": "gpu-1", "mbps": 40, "rttMs": 35}],
            "rttMs": {"edge-edge": 2, "cloud-edge": 25, "cloud-cloud": 0.5},
        }
    )
    jetson = cluster.node("jetson-1")
    assert jetson.memory_bytes == 8 * 2**30 and jetson.tier == "edge"
    assert jetson.labels == {"zone": "a", "n": "1"}
    assert cluster.mbps("gpu-1", "jetson-1") == 40  # link, either direction
    assert cluster.rtt_ms("jetson-1", "gpu-1") == 35
    assert cluster.mbps("jetson-1", "gpu-2") == 100  # min of the uplinks
    assert cluster.rtt_ms("gpu-2", "jetson-1") == 25  # cloud-edge written either way round
    assert cluster.rtt_ms("gpu-1", "gpu-2") == 0.5
    assert inventory.parse_cluster(cluster.to_dict()) == cluster


def test_defaults_when_the_file_names_no_rtt() -> None:
    cluster = a_cluster(a_node("e").edge(), a_node("c").cloud()).build()
    assert cluster.rtt_ms("e", "c") == inventory.DEFAULT_RTT_MS["edge-cloud"]


def _broken(
    node_changes: dict[str, Any] | None = None, drop: str | None = None, **extra: Any
) -> dict[str, Any]:
    nodes = [a_node("good").as_dict(), {**a_node("jetson-2").as_dict(), **(node_changes or {})}]
    if drop:
        del nodes[1][drop]
    return {"nodes": nodes, **extra}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_broken(drop="memory"), "node 'jetson-2': field 'memory' is missing"),
        (_broken(drop="tflops"), "node 'jetson-2': field 'tflops' is missing"),
        (
            _broken({"tier": "fog"}),
            "node 'jetson-2': field 'tier' must be edge or cloud, got 'fog'",
        ),
        (_broken({"memory": "-8Gi"}), "node 'jetson-2': field 'memory' must be > 0"),
        (
            _broken({"memory": "8 gigs"}),
            "node 'jetson-2': field 'memory': not a Kubernetes quantity",
        ),
        (_broken({"tflops": 0}), "node 'jetson-2': field 'tflops' must be > 0, got 0"),
        (
            _broken({"uplinkMbps": -100}),
            "node 'jetson-2': field 'uplinkMbps' must be > 0, got -100",
        ),
        (
            _broken({"memoryBandwidthGBps": "fast"}),
            "node 'jetson-2': field 'memoryBandwidthGBps' must be a number",
        ),
        (_broken({"labels": ["a"]}), "node 'jetson-2': field 'labels' must be a mapping"),
        (_broken({"name": "good"}), "node name"),
        (_broken({"name": ""}), "nodes[1]: field 'name' is missing"),
        (
            _broken(links=[{"a": "good", "b": "ghost", "mbps": 10, "rttMs": 1}]),
            "links[0]: unknown node 'ghost'",
        ),
        (
            _broken(links=[{"a": "good", "b": "jetson-2", "mbps": 0, "rttMs": 1}]),
            "link good-jetson-2: field 'mbps' must be > 0",
        ),
        (
            _broken(links=[{"a": "good", "b": "jetson-2", "mbps": 5}]),
            "link good-jetson-2: field 'rttMs' is missing",
        ),
        (
            _broken(links=[{"a": "good", "b": "good", "mbps": 5, "rttMs": 1}]),
            "links[0]: a link joins two different nodes",
        ),
        (_broken(rttMs={"edge-fog": 3}), "rttMs: unknown tier pair 'edge-fog'"),
        (_broken(rttMs={"edge-edge": -3}), "rttMs: 'edge-edge' must be >= 0"),
        ({"nodes": []}, "'nodes' must be a non-empty list"),
        ({"nodes": ["jetson"]}, "nodes[0]: expected a mapping"),
        (["jetson"], "expected a mapping"),
    ],
)
def test_bad_files_name_the_node_and_field(data: Any, message: str) -> None:
    with pytest.raises(inventory.InventoryError) as raised:
        inventory.parse_cluster(data)
    assert message in str(raised.value)


def test_without_drops_nodes_and_their_links() -> None:
    cluster = (
        a_cluster(a_node("a"), a_node("b"), a_node("c")).link("a", "b", mbps=1, rtt_ms=1).build()
    )
    smaller = cluster.without(["b"])
    assert [n.name for n in smaller.nodes] == ["a", "c"]
    assert smaller.links == ()
