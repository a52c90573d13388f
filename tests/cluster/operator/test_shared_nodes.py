"""Pipelines share nodes, and a hostile spec cannot hurt the operator (real control plane,
kwok nodes, the operator as a real process under the chart's RBAC).

Covers: ten pipelines applied at once on four small nodes: each ends Ready or
Planned=False/InsufficientMemory naming who holds the memory, never stuck with Pending
stage pods; the memory requests bound to each node never exceed its allocatable memory,
and every stage pod requests what its plan reserves; a 100,000-layer config is InvalidSpec
within seconds while the operator's RSS stays under the chart's 512 Mi limit and its
/healthz answers; label-value and length validations refuse bad specs at apply.
"""

from __future__ import annotations

import subprocess
import time
import urllib.request
from typing import Any

import pytest
import yaml
from lightkube import ApiError, Client
from lightkube.resources.core_v1 import Node, Pod

from llmpipe_operator.planning import inventory, live
from tests.cluster.operator.conftest import MODEL_CONFIG, OperatorProcess, Pool, pipeline_manifest
from tests.cluster.operator.test_operator import (
    LLMPipeline,
    apply,
    condition,
    status_of,
    wait_planned_false,
)
from tests.support import control_plane as cp
from tests.support import wait

PIPELINES = 10
OPERATOR_MEMORY_LIMIT = 512 * 2**20
"""The chart's resources.limits.memory for the operator (helm/llmpipe/values.yaml)."""
SMALL_WORKLOAD = {"maxSequences": 2, "maxContextTokens": 256}
"""~541 MiB per pipeline (16 layers of 21.5 MiB, embeddings and head, 64 Mi per stage)."""


@pytest.fixture
def client(control_plane: cp.ControlPlane) -> Client:
    return control_plane.client()


def pod_request(pod: Pod) -> int:
    """The scheduler's memory request of a pod (the operator's own accounting, unit-tested
    in tests/unit/live)."""
    return live.pod_memory_request(pod.to_dict())


def settled(client: Client, namespace: str, name: str) -> dict[str, Any] | None:
    """The status once the pipeline is Ready or refused for memory; None while in between."""
    st = status_of(client, namespace, name)
    planned = condition(st, "Planned")
    if st.get("phase") == "Ready" and st.get("servingPlanHash") == st.get("planHash"):
        return st
    if planned.get("status") == "False" and planned.get("reason") == "InsufficientMemory":
        return st
    return None


def test_competing_pipelines_never_overcommit_a_node(
    control_plane: cp.ControlPlane,
    operator: OperatorProcess,
    namespace: str,
    pool: Pool,
    client: Client,
) -> None:
    names = [pool.add(f"edge-{i}", tier="edge", memory="600Mi") for i in range(4)]
    manifests = [
        pipeline_manifest(f"p{i}", selector=pool.selector, workload=SMALL_WORKLOAD)
        for i in range(PIPELINES)
    ]
    # all ten in one apply: the operator reconciles them concurrently
    result = subprocess.run(
        [str(control_plane.bin_dir / "kubectl"), "apply", "-n", namespace, "-f", "-"],
        input=yaml.safe_dump_all(manifests),
        env=control_plane.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    pending = [f"p{i}" for i in range(PIPELINES)]

    def all_settled() -> dict[str, dict[str, Any]] | None:
        states = {name: settled(client, namespace, name) for name in pending}
        return None if any(st is None for st in states.values()) else states  # type: ignore[misc]

    states: dict[str, dict[str, Any]] = wait.until(
        all_settled,
        what="every pipeline Ready or InsufficientMemory",
        timeout=240,
        interval=1.0,
        seen=lambda: (
            "\n".join(
                f"{n}: {status_of(client, namespace, n).get('phase')} "
                f"{condition(status_of(client, namespace, n), 'Planned').get('message', '')[:200]}"
                for n in pending
            )
            + f"\noperator log:\n{operator.log_tail()}"
        ),
    )
    ready = sorted(n for n, st in states.items() if st["phase"] == "Ready")
    refused = sorted(n for n in states if n not in ready)
    print(f"\nready: {ready}\nInsufficientMemory: {refused}")
    if refused:
        print(f"{refused[0]}: {condition(states[refused[0]], 'Planned')['message']}")
    assert ready, "the first pipeline fits the nodes alone"
    assert refused, "ten pipelines of ~541 MiB cannot all fit 4 x 600 Mi"
    for name in refused:
        message = condition(states[name], "Planned")["message"]
        assert "memory held by others" in message or "others hold all the memory" in message
        assert f"pipeline {namespace}/p" in message, message  # names who holds it
        assert len(message) <= 1024
    # every stage pod requests what its plan reserves, and runs where it was planned
    for name in ready:
        st = states[name]
        pods = list(
            client.list(
                Pod,
                namespace=namespace,
                labels={"llmpipe.io/pipeline": name, "llmpipe.io/plan-hash": st["planHash"]},
            )
        )
        by_index = {int(p.metadata.labels["llmpipe.io/stage-index"]): p for p in pods}
        for stage in st["plan"]["stages"]:
            pod = by_index[stage["index"]]
            assert pod.spec.nodeName == stage["node"]
            assert pod.status.phase == "Running"
            assert pod_request(pod) == stage["memoryBytes"]
    # nothing overcommits: bound requests per node stay within allocatable
    for node_name in names:
        node = client.get(Node, node_name)
        allocatable = inventory.parse_quantity(node.status.allocatable["memory"])
        bound = [
            p
            for p in client.list(Pod, namespace="*", fields={"spec.nodeName": node_name})
            if p.status.phase not in ("Succeeded", "Failed")
        ]
        held = sum(pod_request(p) for p in bound)
        assert 0 < held <= allocatable, (node_name, held, allocatable)
    # and no refused pipeline left objects behind
    refused_pods = [
        p
        for p in client.list(Pod, namespace=namespace)
        if p.metadata.labels.get("llmpipe.io/pipeline") in refused
    ]
    assert refused_pods == []


def test_a_100000_layer_config_is_invalid_at_once_and_costs_no_memory(
    control_plane: cp.ControlPlane,
    operator: OperatorProcess,
    namespace: str,
    pool: Pool,
    client: Client,
) -> None:
    pool.add("edge-a", tier="edge", memory="2Gi")
    manifest = pipeline_manifest("deep", selector=pool.selector)
    manifest["spec"]["model"]["config"] = {**MODEL_CONFIG, "num_hidden_layers": 100_000}
    started = time.monotonic()
    result = apply(control_plane, namespace, manifest)
    assert result.returncode == 0, result.stderr

    st = wait_planned_false(client, operator, namespace, "deep", reason="InvalidSpec", timeout=30)
    elapsed, rss = time.monotonic() - started, operator.rss_bytes()
    print(f"\nInvalidSpec after {elapsed:.2f}s, operator RSS {rss >> 20} MiB")
    planned = condition(st, "Planned")
    assert planned["status"] == "False"
    assert "num_hidden_layers is 100000, more than the bound of 1,024" in planned["message"]
    assert st["phase"] == "Failed"
    assert operator.rss_bytes() < OPERATOR_MEMORY_LIMIT
    with urllib.request.urlopen(
        f"http://127.0.0.1:{operator.health_port}/healthz", timeout=2
    ) as reply:
        assert reply.status == 200


def apply_server_side(
    control_plane: cp.ControlPlane, namespace: str, manifest: dict[str, Any]
) -> subprocess.CompletedProcess[str]:
    """Server-side apply: no last-applied annotation, so a huge field meets the schema."""
    return subprocess.run(
        [
            str(control_plane.bin_dir / "kubectl"),
            "apply",
            "--server-side",
            "-n",
            namespace,
            "-f",
            "-",
        ],
        input=yaml.safe_dump(manifest),
        env=control_plane.env,
        capture_output=True,
        text=True,
        timeout=60,
    )


label_and_length_refusals = pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda m: m["spec"]["placement"].update(nodeSelector={"zone": "x" * 100 * 1024}),
            "spec.placement.nodeSelector.zone: Too long: may not be",
        ),
        (
            lambda m: m["spec"]["placement"].update(nodeSelector={"zone": "-not-a-label"}),
            "spec.placement.nodeSelector.zone in body should match",
        ),
        (
            lambda m: m["spec"]["placement"].update(nodeSelector={"bad key!": "x"}),
            "nodeSelector keys must be Kubernetes label keys",
        ),
        (
            lambda m: m["spec"]["placement"].update(
                tolerations=[{"key": "k", "value": "v" * 64, "effect": "NoSchedule"}]
            ),
            "spec.placement.tolerations[0].value: Too long",
        ),
        (
            lambda m: m["spec"]["placement"].update(excludeNodes=["Not_A_Node"]),
            "spec.placement.excludeNodes[0] in body should match",
        ),
        (
            lambda m: m["spec"]["runtime"].update(image="registry.local/" + "i" * 1024 * 1024),
            "spec.runtime.image: Too long: may not be more than 512",
        ),
    ],
    ids=["selector-100KiB", "selector-value", "selector-key", "toleration", "node-name", "image"],
)


@label_and_length_refusals
def test_label_values_and_lengths_are_refused_at_apply(
    control_plane: cp.ControlPlane, crd: object, namespace: str, mutate: Any, message: str
) -> None:
    manifest = pipeline_manifest("labels", selector={"pool": "none"})
    mutate(manifest)
    result = apply_server_side(control_plane, namespace, manifest)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[:2000]
    assert "metadata.annotations: Too long" not in result.stderr
    with pytest.raises(ApiError):
        control_plane.client().get(LLMPipeline, "labels", namespace=namespace)
