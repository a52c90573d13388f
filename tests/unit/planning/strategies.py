"""Hypothesis strategies: small random planning instances (profiles, clusters, workloads)."""

from __future__ import annotations

from hypothesis import strategies as st

from llmpipe_operator.planning import inventory, planner, profiles

from .builders import GiB, MiB, a_cluster, a_node


@st.composite
def small_profiles(draw: st.DrawFn, *, max_layers: int = 6) -> profiles.ModelProfile:
    layers = draw(st.integers(1, max_layers))
    sizes = draw(st.lists(st.integers(1, 8), min_size=layers, max_size=layers))
    return profiles.ModelProfile(
        name="random",
        num_layers=layers,
        hidden_size=draw(st.sampled_from([256, 4096, 8192])),
        layer_bytes=tuple(s * 128 * MiB for s in sizes),
        embed_bytes=draw(st.integers(0, 6)) * 64 * MiB,
        head_bytes=draw(st.integers(0, 6)) * 64 * MiB,
        kv_bytes_per_token_per_layer=draw(st.sampled_from([0, 256, 4096])),
        activation_bytes=2,
        weight_bytes_per_param=2,
    )


@st.composite
def small_clusters(
    draw: st.DrawFn, *, min_nodes: int = 1, max_nodes: int = 4
) -> inventory.Inventory:
    count = draw(st.integers(min_nodes, max_nodes))
    nodes = []
    for i in range(count):
        node = a_node(f"n{i}").memory(draw(st.integers(1, 12)) * GiB // 2)
        node = node.edge() if draw(st.booleans()) else node.cloud()
        node = node.tflops(draw(st.sampled_from([0.1, 1.0, 8.0, 100.0])))
        node = node.bandwidth(draw(st.sampled_from([5.0, 60.0, 900.0])))
        kind = draw(st.sampled_from(["cpu", "cpu", "gpu", "unified"]))
        if kind == "gpu":  # a discrete GPU: its own memory, the table's speed
            product = draw(st.sampled_from(["NVIDIA-L4", "Tesla-T4", "NVIDIA-A100-SXM4-40GB"]))
            node = node.gpu(product, memory_mib=draw(st.integers(1, 12)) * 512)
        elif kind == "unified":  # a Jetson: the GPU computes out of the node's memory
            node = node.gpu("NVIDIA-Jetson-AGX-Orin", memory_mib=None)
        timing = draw(st.sampled_from(["default", "none", "measured", "curve"]))
        if timing != "default":  # default: derived from the compute figure
            node = node.timings(
                layer=draw(st.sampled_from([0.0, 1e-4, 5e-3])) if timing != "none" else 0.0,
                token=draw(st.sampled_from([0.0, 1e-5])) if timing != "none" else 0.0,
                step=draw(st.sampled_from([0.0, 2e-3])) if timing != "none" else 0.0,
                hop=draw(st.sampled_from([0.0, 1e-3, 2e-2])) if timing != "none" else 0.0,
                products=_curve(draw) if timing == "curve" else None,
            )
        nodes.append(node.uplink(draw(st.sampled_from([10.0, 100.0, 1000.0, 10000.0]))))
    cluster = a_cluster(*nodes)
    if count >= 2 and draw(st.booleans()):
        a, b = draw(st.lists(st.integers(0, count - 1), min_size=2, max_size=2, unique=True))
        cluster = cluster.link(
            f"n{a}",
            f"n{b}",
            mbps=draw(st.sampled_from([1.0, 40.0, 5000.0])),
            rtt_ms=draw(st.sampled_from([0.0, 5.0, 80.0])),
        )
    if draw(st.booleans()):
        cluster = cluster.rtt_ms(edge_cloud=draw(st.sampled_from([1.0, 30.0, 200.0])))
    return cluster.build()


def _curve(draw: st.DrawFn) -> dict[str, float]:
    """A measured product curve, noisy (not monotone) as measurements are."""
    tokens = draw(st.lists(st.sampled_from([1, 2, 4, 8, 16, 32]), min_size=1, max_size=4))
    return {str(t): draw(st.sampled_from([5e-12, 5e-11, 2e-10, 1e-9])) for t in tokens}


@st.composite
def workloads(draw: st.DrawFn) -> planner.Workload:
    return planner.Workload(
        objective=draw(st.sampled_from(["throughput", "latency"])),
        max_sequences=draw(st.sampled_from([1, 4, 6, 64])),
        max_context_tokens=draw(st.sampled_from([128, 2048])),
        runtime_overhead_bytes=draw(st.sampled_from([0, 256 * MiB])),
        device=draw(st.sampled_from(["auto", "auto", "cpu", "cuda"])),
        average_context_tokens=draw(st.sampled_from([None, 1, 128])),
        # D, stage 0's draft model: none, or small to large beside the nodes' 0.5-6 GiB
        first_stage_bytes=draw(st.sampled_from([0, 0, 192 * MiB, 2 * GiB])),
    )


@st.composite
def placements(draw: st.DrawFn) -> planner.Placement:
    return planner.Placement(
        first_stage=draw(st.sampled_from(["any", "edge"])),
        last_stage=draw(st.sampled_from(["any", "edge"])),
        max_stages=draw(st.sampled_from([None, None, 1, 2, 3])),
    )
