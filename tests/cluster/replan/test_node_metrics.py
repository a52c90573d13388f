"""Node memory usage from metrics.k8s.io, read by the operator under the chart's RBAC.

The control plane has no metrics-server, so a CustomResourceDefinition stands in for it:
it makes the real API server serve `metrics.k8s.io/v1beta1` NodeMetrics (cluster-scoped,
plural `nodes`) at the very path metrics-server's APIService answers. The operator's
client, RBAC and parsing are exercised for real; only the figures are ours.

Covers: usage is read and parsed; a node whose memory is mostly in use by others gets no
stage although it is the fastest; without the API the operator plans on allocatable memory
(tests/cluster/replan/test_replan.py checks the note).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import yaml
from lightkube import AsyncClient, KubeConfig

from llmpipe_operator.k8s import metrics_api
from tests.support import control_plane as cp
from tests.support import wait

from . import harness

STAND_IN = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {
        "name": "nodes.metrics.k8s.io",
        # *.k8s.io groups need this annotation; "unapproved" is the documented opt-out
        "annotations": {"api-approved.kubernetes.io": "unapproved, test stand-in"},
    },
    "spec": {
        "group": "metrics.k8s.io",
        "scope": "Cluster",
        "names": {"kind": "NodeMetrics", "plural": "nodes", "singular": "node",
                  "listKind": "NodeMetricsList"},
        "versions": [{
            "name": "v1beta1", "served": True, "storage": True,
            "schema": {"openAPIV3Schema": {"type": "object",
                                           "x-kubernetes-preserve-unknown-fields": True}},
        }],
    },
}  # fmt: skip

ROOMY = {"tier": "cloud", "memory": "4Gi", "tflops": 100.0}


@pytest.fixture
def metrics_stand_in(control_plane: cp.ControlPlane, tmp_path) -> Iterator[None]:
    path = tmp_path / "metrics-crd.yaml"
    path.write_text(yaml.safe_dump(STAND_IN))
    control_plane.kubectl("apply", "-f", str(path))
    control_plane.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/nodes.metrics.k8s.io"
    )
    yield
    control_plane.kubectl("delete", "--ignore-not-found", "--wait=true", "-f", str(path))


def report_usage(lab: harness.Lab, node: str, memory: str) -> None:
    """What metrics-server would report for the node (applied with the real kubectl)."""
    document = {
        "apiVersion": "metrics.k8s.io/v1beta1",
        "kind": "NodeMetrics",
        "metadata": {"name": node},
        "timestamp": "2026-11-21T00:00:00Z",
        "window": "20s",
        "usage": {"cpu": "100m", "memory": memory},
    }
    path = lab.workdir / f"metrics-{node}.yaml"
    path.write_text(yaml.safe_dump(document))
    lab.plane.kubectl("apply", "-f", str(path))


async def test_usage_is_read_from_metrics_k8s_io(lab, metrics_stand_in) -> None:
    node = lab.add_node("busy", **ROOMY)
    report_usage(lab, node, "1536Mi")
    client = AsyncClient(KubeConfig.from_file(lab.plane.kubeconfig))
    try:
        usage = await metrics_api.read_node_usage(client)
    finally:
        await client.close()
    assert usage.served
    assert usage.memory_bytes[node] == 1536 * 1024**2
    assert usage.note.startswith("memory usage from metrics.k8s.io")


def test_a_node_busy_with_others_gets_no_stage(lab, metrics_stand_in, tmp_path) -> None:
    busy = lab.add_node("busy", memory_bandwidth_gbps=300, **ROOMY)  # fastest, but full
    free = lab.add_node("free", memory_bandwidth_gbps=100, **ROOMY)
    report_usage(lab, busy, "4080Mi")  # 16 MiB left: the model needs about 70 MB
    report_usage(lab, free, "100Mi")
    operator = harness.OperatorProcess.start(lab.plane, lab.namespace, tmp_path / "op.log")
    try:
        wait.until(
            lambda: "llmpipe_node_metrics_served 1.0" in operator.metrics(),
            what="the operator to read metrics.k8s.io",
            timeout=30,
        )
        lab.apply_pipeline("chat", placement={"maxStages": 1})
        st = lab.wait_ready("chat")
        assert lab.planned_nodes(st) == [free]
    finally:
        operator.stop()
