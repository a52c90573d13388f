"""GPU nodes: GPU Feature Discovery labels, the product table, and planning on GPU memory.

Covers: `planning.devices` (product names as GFD writes them, label values winning over
the table, bad labels named), the cluster file's node labels read exactly like a live
Node's, the planner's GPU memory budget (discrete GPUs: their own memory; Jetsons: one
budget), GPU compute in the estimates, `spec.runtime.device` (cpu / cuda), and the
invariant that no plan puts more than `nvidia.com/gpu.memory` minus the runtime overhead
of weights and KV cache on a GPU.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmpipe_operator.planning import cost, devices, inventory, live, planner

from .builders import GiB, MiB, a_cluster, a_node, a_profile

L4 = {
    "nvidia.com/gpu.count": "1",
    "nvidia.com/gpu.memory": "24576",
    "nvidia.com/gpu.product": "NVIDIA-L4",
}

products = pytest.mark.parametrize(
    ("label", "name"),
    [
        ("NVIDIA-A100-SXM4-80GB", "A100 80GB SXM"),
        ("NVIDIA-A100-SXM4-40GB", "A100 40GB"),
        ("NVIDIA-A100-80GB-PCIe", "A100 80GB PCIe"),
        ("NVIDIA-H100-80GB-HBM3", "H100 SXM"),
        ("NVIDIA-H100-PCIe", "H100 PCIe"),
        ("NVIDIA-H200", "H200"),
        ("NVIDIA-L4", "L4"),
        ("NVIDIA-L40S", "L40S"),
        ("NVIDIA-A10", "A10"),
        ("Tesla-T4", "T4"),
        ("NVIDIA-GeForce-RTX-4090", "GeForce RTX 4090"),
        ("NVIDIA-Jetson-AGX-Orin-Developer-Kit", "Jetson AGX Orin 64GB"),
        ("NVIDIA Jetson AGX Orin 32GB", "Jetson AGX Orin 32GB"),
        ("NVIDIA-Jetson-Orin-NX", "Jetson Orin NX 16GB"),
        ("NVIDIA-Jetson-Orin-Nano-Developer-Kit", "Jetson Orin Nano 8GB"),
    ],
)


@products
def test_gfd_product_names_find_their_table_entry(label: str, name: str) -> None:
    product = devices.find_product(label)
    assert product is not None and product.name == name


@pytest.mark.parametrize("label", ["NVIDIA-A10G", "Tesla-V100-SXM2-16GB", "Orin", ""])
def test_unknown_products_are_not_guessed(label: str) -> None:
    assert devices.find_product(label) is None


def test_every_product_has_positive_figures_and_a_comment_citing_its_sheet() -> None:
    for product in devices.PRODUCTS:
        assert product.tflops > 0 and product.memory_bandwidth_gbps > 0
        assert product.memory_mib > 0
    with open(devices.__file__) as source:
        lines = source.read().splitlines()
    entries = [i for i, line in enumerate(lines) if line.strip() == "Product("]
    assert len(entries) == len(devices.PRODUCTS)
    for at in entries:
        comment = lines[at - 1].strip()
        assert comment.startswith("#"), f"no citation above line {at + 1}"


def read(labels: dict[str, str], **kw: Any) -> devices.Gpu | None:
    return devices.read_gpu(labels, where="node 'n'", tflops=None, memory_bandwidth_gbps=None, **kw)


def test_l4_labels_give_its_memory_and_the_table_speed() -> None:
    gpu = read(L4)
    assert gpu is not None
    assert (gpu.count, gpu.memory_bytes, gpu.unified, gpu.bf16) == (1, 24 * GiB, False, True)
    assert (gpu.tflops, gpu.memory_bandwidth_gbps) == (121.0, 300.0)


def test_label_values_win_over_the_table() -> None:
    gpu = devices.read_gpu(L4, where="n", tflops=80.0, memory_bandwidth_gbps=250.0)
    assert gpu is not None and (gpu.tflops, gpu.memory_bandwidth_gbps) == (80.0, 250.0)
    own = read({**L4, "nvidia.com/gpu.memory": "20000"})
    assert own is not None and own.memory_bytes == 20000 * MiB


def test_allocatable_caps_the_count_and_held_gpus_are_not_offered() -> None:
    two = {**L4, "nvidia.com/gpu.count": "2"}
    gpu = read(two, allocatable=1)
    assert gpu is not None and gpu.count == 1
    assert read(two, allocatable=0) is None  # the device plugin is not running there
    assert read(two, allocatable=2, held=2) is None  # other pods hold both
    held_one = read(two, allocatable=2, held=1)
    assert held_one is not None and held_one.count == 1


def test_a_jetson_is_one_memory_budget() -> None:
    gpu = read({"nvidia.com/gpu.count": "1", "nvidia.com/gpu.product": "Jetson-AGX-Orin"})
    assert gpu is not None and gpu.unified
    forced = read({**L4, devices.LABEL_UNIFIED_MEMORY: "true"})
    assert forced is not None and forced.unified


def test_t4_runs_float16_under_auto() -> None:
    gpu = read({"nvidia.com/gpu.count": "1", "nvidia.com/gpu.product": "Tesla-T4"})
    assert gpu is not None and devices.gpu_dtype(gpu) == "float16"
    assert gpu.memory_bytes == 15360 * MiB  # the table's, GFD left memory out


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ({"nvidia.com/gpu.count": "one"}, "gpu.count must be a whole number"),
        ({**L4, "nvidia.com/gpu.memory": "-1"}, "gpu.memory must be a positive number"),
        (
            {"nvidia.com/gpu.count": "1", "nvidia.com/gpu.product": "ACME-X1"},
            "label nvidia.com/gpu.memory",
        ),
        (
            {"nvidia.com/gpu.count": "1", "nvidia.com/gpu.memory": "8000"},
            "label llmpipe.io/tflops",
        ),
        ({**L4, devices.LABEL_UNIFIED_MEMORY: "yes"}, "must be true or false"),
    ],
)
def test_bad_gpu_labels_are_named(labels: dict[str, str], message: str) -> None:
    with pytest.raises(devices.DeviceError, match=message):
        read(labels)


def test_gpus_without_gfd_labels_plan_as_a_cpu_node() -> None:
    assert read({}, allocatable=4) is None


# the cluster file reads labels like a live node ---------------------------------------------


def live_node(labels: dict[str, str], *, allocatable_gpus: str | None = "1") -> dict[str, Any]:
    allocatable = {"memory": "8Gi", "cpu": "8"}
    if allocatable_gpus is not None:
        allocatable[devices.RESOURCE_GPU] = allocatable_gpus
    return {
        "metadata": {"name": "gpu-1", "labels": {"llmpipe.io/uplink-mbps": "10000", **labels}},
        "status": {
            "allocatable": allocatable,
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def test_the_cluster_file_and_a_live_node_give_the_same_node() -> None:
    from_file = inventory.parse_cluster(
        {
            "nodes": [
                {
                    "name": "gpu-1",
                    "tier": "cloud",
                    "memory": "8Gi",
                    "uplinkMbps": 10000,
                    "labels": {"llmpipe.io/uplink-mbps": "10000", **L4},
                }
            ]
        }
    ).nodes[0]
    from_node = live.to_node(live_node(L4))
    assert from_file == from_node
    assert from_file.gpu is not None and from_file.gpu.memory_bytes == 24 * GiB


def test_a_live_node_without_allocatable_gpus_is_a_cpu_node() -> None:
    assert live.to_node(live_node(L4, allocatable_gpus=None)).gpu is None


def test_pods_holding_the_gpus_leave_none_for_the_planner() -> None:
    pod = {
        "metadata": {"name": "trainer", "namespace": "ml"},
        "spec": {
            "nodeName": "gpu-1",
            "containers": [{"resources": {"limits": {devices.RESOURCE_GPU: "1"}}}],
        },
    }
    holdings = live.held_memory([pod], pipeline=("default", "p"), reservations={})
    assert holdings.gpus == {"gpu-1": 1}
    built = live.build_inventory(
        [live_node(L4)], eligibility=live.Eligibility(), gpus_held=holdings.gpus
    )
    assert built.inventory.nodes[0].gpu is None


def test_other_pipelines_planned_gpu_stages_hold_their_gpus() -> None:
    reservation = live.Reservation(digest="abc", stages={0: ("gpu-1", 512 * MiB)}, gpus={0: 1})
    holdings = live.held_memory(
        [], pipeline=("default", "p"), reservations={("default", "other"): reservation}
    )
    assert holdings.gpus == {"gpu-1": 1}
    assert holdings.total == {"gpu-1": 512 * MiB}


def test_a_file_node_without_compute_figures_needs_a_known_gpu() -> None:
    node = {"name": "x", "tier": "cloud", "memory": "8Gi", "uplinkMbps": 1000}
    with pytest.raises(inventory.InventoryError, match="'tflops' is missing"):
        inventory.parse_cluster({"nodes": [node]})
    figures = {"llmpipe.io/tflops": "3", "llmpipe.io/memory-bandwidth-gbps": "40"}
    labelled = {**node, "labels": figures}
    parsed = inventory.parse_cluster({"nodes": [labelled]}).nodes[0]
    assert (parsed.tflops, parsed.memory_bandwidth_gbps, parsed.gpu) == (3.0, 40.0, None)


# planning on GPU memory -----------------------------------------------------------------------

# 12 layers of 1 GiB: 12 GiB of weights (plus embeddings and head), more than the node's 8 GiB
BIG = a_profile(12, layer_size=GiB).kv_per_token_per_layer(0).build()


def test_an_l4_node_with_8gi_offers_24_gib_for_its_stage() -> None:
    cluster = a_cluster(a_node("gpu-1").cloud().memory("8Gi").gpu()).build()
    plan = planner.plan_pipeline(BIG, cluster, workload=planner.Workload())
    (stage,) = plan.stages
    assert (stage.device, stage.gpus, stage.dtype) == ("cuda", 1, "bfloat16")
    assert stage.memory_bytes > 8 * GiB  # on the GPU
    assert stage.host_bytes == planner.Workload().runtime_overhead_bytes  # asked of the node
    with pytest.raises(planner.PlanInfeasible):
        planner.plan_pipeline(BIG, cluster, workload=planner.Workload(device="cpu"))


def test_a_jetson_offers_its_memory_once() -> None:
    jetson = a_node("jetson").edge().memory("8Gi").gpu("Jetson-AGX-Orin", memory_mib=65536)
    cluster = a_cluster(jetson).build()
    with pytest.raises(planner.PlanInfeasible):  # 8 GiB allocatable: GFD's 64 GiB is the same RAM
        planner.plan_pipeline(BIG, cluster, workload=planner.Workload())
    small = a_profile(4).build()
    (stage,) = planner.plan_pipeline(small, cluster, workload=planner.Workload()).stages
    assert stage.device == "cuda" and stage.host_bytes == stage.memory_bytes


def test_gpu_stages_are_costed_at_the_gpus_speed() -> None:
    cluster = a_cluster(a_node("gpu-1").cloud().memory("8Gi").gpu().no_fixed_costs()).build()
    workload = planner.Workload(max_sequences=1)
    plan = planner.plan_pipeline(BIG, cluster, workload=workload)
    weights = cost.weight_bytes(BIG, 0, BIG.num_layers)
    assert plan.stages[0].compute_seconds == pytest.approx(weights / 300e9)  # L4: 300 GB/s
    labelled = a_cluster(
        a_node("gpu-1")
        .cloud()
        .memory("8Gi")
        .gpu()
        .label("llmpipe.io/memory-bandwidth-gbps", "150")
        .no_fixed_costs()
    ).build()
    slower = planner.plan_pipeline(BIG, labelled, workload=workload)
    assert slower.stages[0].compute_seconds == pytest.approx(weights / 150e9)


def test_the_planner_prefers_the_gpu_and_device_cuda_refuses_cpu_nodes() -> None:
    cpu = a_node("cpu-1").cloud().memory("64Gi").tflops(1.0).bandwidth(50.0)
    gpu = a_node("gpu-1").cloud().memory("8Gi").gpu()
    cluster = a_cluster(cpu, gpu).build()
    plan = planner.plan_pipeline(BIG, cluster, workload=planner.Workload(objective="latency"))
    assert [s.node for s in plan.stages] == ["gpu-1"]
    only_cpu = a_cluster(cpu).build()
    with pytest.raises(planner.PlanInfeasible, match="none with a free GPU") as raised:
        planner.plan_pipeline(BIG, only_cpu, workload=planner.Workload(device="cuda"))
    assert raised.value.reason == "no-gpu"


def test_a_t4_stage_runs_float16_and_an_explicit_dtype_wins() -> None:
    t4 = a_node("t4").cloud().memory("8Gi").gpu("Tesla-T4", memory_mib=15360)
    cluster = a_cluster(t4).build()
    small = a_profile(4).build()
    (auto,) = planner.plan_pipeline(small, cluster, workload=planner.Workload()).stages
    assert auto.dtype == "float16"
    explicit = planner.Workload(dtype="float32")
    (stage,) = planner.plan_pipeline(small, cluster, workload=explicit).stages
    assert stage.dtype == "float32"


@st.composite
def gpu_clusters(draw: st.DrawFn) -> inventory.Inventory:
    count = draw(st.integers(1, 4))
    nodes = []
    for i in range(count):
        node = a_node(f"g{i}").cloud().memory(draw(st.integers(1, 16)) * GiB // 2)
        node = node.gpu(
            draw(st.sampled_from(["NVIDIA-L4", "Tesla-T4", "NVIDIA-H100-PCIe"])),
            memory_mib=draw(st.integers(1, 24)) * 512,
        )
        nodes.append(node)
    return a_cluster(*nodes).build()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    gpu_clusters(),
    st.integers(1, 8),
    st.sampled_from([0, 4096, 65536]),
    st.sampled_from([1, 8, 32]),
    st.sampled_from([0, 256 * MiB, 512 * MiB]),
    st.sampled_from(["throughput", "latency"]),
)
def test_no_plan_puts_more_than_gpu_memory_less_overhead_on_a_gpu(
    cluster: inventory.Inventory,
    layers: int,
    kv_per_token: int,
    sequences: int,
    overhead: int,
    objective: str,
) -> None:
    profile = a_profile(layers, layer_size=768 * MiB).kv_per_token_per_layer(kv_per_token).build()
    workload = planner.Workload(
        objective=objective,  # type: ignore[arg-type]
        max_sequences=sequences,
        max_context_tokens=1024,
        runtime_overhead_bytes=overhead,
    )
    try:
        plan = planner.plan_pipeline(profile, cluster, workload=workload)
    except planner.PlanInfeasible:
        return
    for stage in plan.stages:
        labels = cluster.node(stage.node).labels
        gpu_bytes = int(labels["nvidia.com/gpu.memory"]) * MiB
        weights = cost.weight_bytes(profile, stage.layer_start, stage.layer_end)
        kv = workload.kv_tokens * kv_per_token * (stage.layer_end - stage.layer_start)
        assert stage.device == "cuda"
        assert weights + kv <= gpu_bytes - overhead
        assert stage.host_bytes == overhead <= cluster.node(stage.node).memory_bytes
