"""Manifests of GPU and CPU stages: what a plan with a GPU stage renders to.

Covers: a GPU stage's `nvidia.com/gpu: 1` limit, its memory request (the runtime overhead
only: weights and KV cache are in GPU memory), its RuntimeClass (from the spec, else the
runtime profile; never on CPU stages), the GPU taint toleration the spec lists; a CPU
stage's `--threads` from its CPU limit or request and its CPU request; the GGUF
conversion at the stage's dtype; the plan ConfigMap carrying each stage's device.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from llmpipe_operator import policy
from llmpipe_operator import spec as spec_mod
from llmpipe_operator.manifests import names, render, stages
from llmpipe_operator.planning import inventory, planner
from tests.unit.manifests.builders import REF, a_spec

GPU_TAINT = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def edge_and_gpu() -> inventory.Inventory:
    """A small edge board for stage 0 and an L4 node labelled by GPU Feature Discovery."""
    return inventory.parse_cluster(
        {
            "nodes": [
                {
                    "name": "edge-a",
                    "tier": "edge",
                    "memory": "2Gi",
                    "tflops": 1.0,
                    "memoryBandwidthGBps": 50,
                    "uplinkMbps": 1000,
                },
                {
                    "name": "gpu-1",
                    "tier": "cloud",
                    "memory": "8Gi",
                    "uplinkMbps": 10000,
                    "labels": {
                        "nvidia.com/gpu.count": "1",
                        "nvidia.com/gpu.memory": "24576",
                        "nvidia.com/gpu.product": "NVIDIA-L4",
                    },
                },
            ]
        }
    )


def a_gpu_plan(spec: spec_mod.PipelineSpec) -> dict[str, Any]:
    """The real planner's plan: stage 0 on the edge board, stage 1 on the L4."""
    workload = planner.Workload(
        objective=spec.workload.objective,
        max_sequences=spec.workload.max_sequences,
        max_context_tokens=spec.workload.max_context_tokens,
        runtime_overhead_bytes=spec.runtime.runtime_overhead_bytes,
        device=spec.runtime.device,
        dtype=spec.model.dtype,
    )
    placement = planner.Placement(first_stage="edge", max_stages=2)
    plan = planner.plan_pipeline(
        spec.profile(), edge_and_gpu(), workload=workload, placement=placement
    ).to_dict()
    assert [(s["node"], s["device"]) for s in plan["stages"]] == [
        ("edge-a", "cpu"),
        ("gpu-1", "cuda"),
    ]
    return plan


def containers(spec: spec_mod.PipelineSpec) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(pod spec, stage container) of every stage of the GPU plan."""
    out = []
    for stage in a_gpu_plan(spec)["stages"]:
        pod = stages.build_stage_deployment(REF, spec, stage, digest="abcd1234")["spec"][
            "template"
        ]["spec"]
        out.append((pod, pod["containers"][0]))
    return out


def test_the_gpu_stage_asks_for_one_gpu_and_only_the_overhead_of_node_memory() -> None:
    spec = a_spec().build()
    (_, cpu), (_, gpu) = containers(spec)
    overhead = str(spec.runtime.runtime_overhead_bytes)
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu["resources"]["requests"]["memory"] == overhead
    assert gpu["resources"]["limits"]["memory"] == overhead
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {})
    assert int(cpu["resources"]["requests"]["memory"]) > int(overhead)


def test_runtime_class_from_the_spec_on_gpu_stages_only() -> None:
    spec = a_spec().runtime(runtimeClassName="nvidia").build()
    (cpu_pod, _), (gpu_pod, _) = containers(spec)
    assert gpu_pod["runtimeClassName"] == "nvidia"
    assert "runtimeClassName" not in cpu_pod


def test_runtime_class_from_the_runtime_profile() -> None:
    profile = policy.RuntimeProfile(
        name="gpu", image="ghcr.io/llmpipe/llmpipe-stage:0.1.0-cu128", runtime_class_name="nvidia"
    )
    rules = policy.Policy(profiles={"gpu": profile}, default_profile="gpu")
    spec = policy.resolve(a_spec().parsed(), rules)
    assert spec.runtime.runtime_class_name == "nvidia"
    (_, _), (gpu_pod, gpu) = containers(spec)
    assert gpu_pod["runtimeClassName"] == "nvidia"
    assert gpu["image"] == "ghcr.io/llmpipe/llmpipe-stage:0.1.0-cu128"
    own = policy.resolve(a_spec().runtime(runtimeClassName="nvidia-cdi").parsed(), rules)
    assert own.runtime.runtime_class_name == "nvidia-cdi"  # the spec's own wins


def test_policy_parses_a_profiles_runtime_class() -> None:
    raw = {"runtimeProfiles": {"gpu": {"image": "x/stage:1", "runtimeClassName": "nvidia"}}}
    raw["defaultProfile"] = "gpu"
    assert policy.parse_policy(raw).profiles["gpu"].runtime_class_name == "nvidia"
    raw["runtimeProfiles"]["gpu"]["runtimeClassName"] = "Not A Name"
    with pytest.raises(policy.PolicyError, match="runtimeClassName"):
        policy.parse_policy(raw)


def test_the_gpu_taint_toleration_reaches_the_stage_pods() -> None:
    spec = a_spec().placement(tolerations=[GPU_TAINT]).build()
    for pod, _ in containers(spec):
        assert pod["tolerations"] == [GPU_TAINT]


threads = pytest.mark.parametrize(
    ("resources", "expected_threads", "expected_cpu_request"),
    [
        ({"limits": {"cpu": "4"}}, "4", "4"),
        ({"limits": {"cpu": "1500m"}}, "2", "1500m"),
        ({"requests": {"cpu": "3"}}, "3", "3"),
        ({"requests": {"cpu": "250m"}, "limits": {"cpu": "2"}}, "2", "250m"),
        ({}, None, "100m"),
    ],
)


@threads
def test_a_cpu_stage_runs_as_many_threads_as_its_cpu_limit_or_request(
    resources: dict[str, Any], expected_threads: str | None, expected_cpu_request: str
) -> None:
    spec = a_spec().runtime(resources=resources).build()
    (_, cpu), (_, gpu) = containers(spec)
    command = cpu["command"]
    if expected_threads is None:
        assert "--threads" not in command
    else:
        assert command[command.index("--threads") + 1] == expected_threads
    assert command[-2] == "--model-dir"  # the stage contract keeps it last
    assert cpu["resources"]["requests"]["cpu"] == expected_cpu_request
    assert gpu["resources"]["requests"]["cpu"] == expected_cpu_request
    assert "--threads" not in gpu["command"]  # the GPU computes; torch's CPU threads idle


def test_spec_device_cpu_keeps_every_stage_off_the_gpu() -> None:
    spec = a_spec().runtime(device="cpu").build()
    workload = planner.Workload(
        device="cpu", runtime_overhead_bytes=spec.runtime.runtime_overhead_bytes
    )
    plan = planner.plan_pipeline(spec.profile(), edge_and_gpu(), workload=workload).to_dict()
    for stage in plan["stages"]:
        assert stage["device"] == "cpu" and stage["gpus"] == 0
        pod = stages.build_stage_deployment(REF, spec, stage, digest="abcd1234")
        (container,) = pod["spec"]["template"]["spec"]["containers"]
        assert "nvidia.com/gpu" not in container["resources"]["limits"]


def test_gguf_conversion_runs_at_the_stages_dtype() -> None:
    spec = a_spec().gguf(hostPath="/var/lib/llmpipe/models/tiny.gguf").build()
    plan = a_gpu_plan(spec)
    plan["stages"][1]["dtype"] = "float16"  # as planned for a T4
    pod = stages.build_stage_deployment(REF, spec, plan["stages"][1], digest="abcd1234")
    (convert,) = pod["spec"]["template"]["spec"]["initContainers"]
    assert convert["command"][convert["command"].index("--dtype") + 1] == "float16"


def test_the_plan_configmap_tells_each_stage_its_device_and_dtype() -> None:
    spec = a_spec().build()
    plan = a_gpu_plan(spec)
    objects = render.render_plan(REF, spec, plan, digest=names.plan_hash(plan, spec))
    (configmap,) = [o for o in objects if o["kind"] == "ConfigMap"]
    written = json.loads(configmap["data"]["plan.json"])
    assert [(s["device"], s["dtype"]) for s in written["stages"]] == [
        ("cpu", "bfloat16"),
        ("cuda", "bfloat16"),
    ]
