"""The test control plane is a real cluster, not a mock.

Covers: simulated nodes from a cluster file (labels, capacity, links annotation); the real
scheduler honouring required node affinity (bound to the edge node, pod Running with an IP,
Service endpoints ready) and refusing an unsatisfiable one (Pending + FailedScheduling);
the garbage collector deleting dependents; server-side apply with a field manager
(ownership, conflict, force); cordon, NotReady that kwok does not undo, node removal;
RBAC with a ServiceAccount token; the binaries reporting their real versions; the
`scripts/control-plane` CLI leaving no process behind.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from lightkube import ApiError
from lightkube.models.meta_v1 import ObjectMeta, OwnerReference
from lightkube.resources.apps_v1 import Deployment, ReplicaSet
from lightkube.resources.core_v1 import ConfigMap, Node, Pod, Service
from lightkube.resources.discovery_v1 import EndpointSlice
from lightkube.resources.rbac_authorization_v1 import Role, RoleBinding

from tests.support import control_plane as cp
from tests.support import nodes, wait

REPO = Path(__file__).resolve().parents[2]
SMALL_CLUSTER = REPO / "tests" / "support" / "clusters" / "small.yaml"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def hostname_affinity(*hostnames: str) -> dict[str, object]:
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {
                        "matchExpressions": [
                            {
                                "key": "kubernetes.io/hostname",
                                "operator": "In",
                                "values": list(hostnames),
                            },
                        ]
                    }
                ],
            }
        }
    }


def deployment(name: str, *, affinity: dict[str, object], replicas: int = 1) -> Deployment:
    labels = {"app": name}
    return Deployment.from_dict(
        {
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "affinity": affinity,
                        "containers": [
                            {
                                "name": "main",
                                "image": "registry.invalid/llmpipe/stage:test",
                                "ports": [{"name": "grpc", "containerPort": 50051}],
                                "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}},
                            }
                        ],
                    },
                },
            },
        }
    )


@pytest.fixture
def small_cluster(control_plane: cp.ControlPlane) -> dict[str, str]:
    """The nodes of tests/support/clusters/small.yaml under a unique prefix; removed after."""
    prefix = unique("t") + "-"
    added = control_plane.add_nodes_from_file(SMALL_CLUSTER, prefix=prefix)
    names = {node.metadata.name.removeprefix(prefix): node.metadata.name for node in added}
    yield names
    for name in names.values():
        control_plane.remove_node(name)


def test_nodes_from_cluster_file_carry_labels_capacity_and_links(
    control_plane: cp.ControlPlane, small_cluster: dict[str, str]
) -> None:
    client = control_plane.client()
    edge = client.get(Node, small_cluster["cp-edge-1"])
    cloud = client.get(Node, small_cluster["cp-cloud-1"])

    labels = edge.metadata.labels
    assert labels["llmpipe.io/tier"] == "edge"
    assert labels["llmpipe.io/tflops"] == "1.3"
    assert labels["llmpipe.io/memory-bandwidth-gbps"] == "60"
    assert labels["llmpipe.io/uplink-mbps"] == "100"
    assert labels["kubernetes.io/hostname"] == small_cluster["cp-edge-1"]
    assert labels["node-role.kubernetes.io/edge"] == "true"
    assert labels["topology.kubernetes.io/zone"] == "shop-floor"
    assert "node-role.kubernetes.io/edge" not in cloud.metadata.labels
    assert cloud.metadata.labels["llmpipe.io/tier"] == "cloud"

    assert edge.status.allocatable["memory"] == "8Gi"
    assert edge.status.capacity["memory"] == "8Gi"
    assert cloud.status.allocatable["memory"] == "64Gi"
    assert edge.status.allocatable["cpu"] == "4"

    links = json.loads(edge.metadata.annotations[nodes.LINKS_ANNOTATION])
    assert links == {small_cluster["cp-cloud-1"]: {"mbps": 40.0, "rttMs": 35.0}}
    back = json.loads(cloud.metadata.annotations[nodes.LINKS_ANNOTATION])
    assert back == {small_cluster["cp-edge-1"]: {"mbps": 40.0, "rttMs": 35.0}}
    assert edge.metadata.annotations[nodes.KWOK_ANNOTATION] == "fake"


def test_required_edge_affinity_is_bound_by_the_scheduler_and_runs(
    control_plane: cp.ControlPlane, small_cluster: dict[str, str], namespace: str
) -> None:
    client = control_plane.client()
    edge = small_cluster["cp-edge-1"]
    client.create(deployment("stage-0", affinity=hostname_affinity(edge)), namespace=namespace)
    client.create(
        Service.from_dict(
            {
                "metadata": {"name": "stage-0"},
                "spec": {
                    "selector": {"app": "stage-0"},
                    "ports": [{"name": "grpc", "port": 50051}],
                },
            }
        ),
        namespace=namespace,
    )

    wait.deployment_available(client, "stage-0", namespace)
    (pod,) = wait.pods(
        client,
        namespace,
        labels={"app": "stage-0"},
        count=1,
        predicate=wait.is_running,
        what="running stage-0 pods",
    )
    assert pod.spec.nodeName == edge
    assert pod.status.podIP, "kwok gives every pod an IP"
    scheduled = wait.event(client, namespace, involved=pod.metadata.name, reason="Scheduled")
    assert edge in scheduled.message
    assert scheduled.source.component == "default-scheduler" or (
        scheduled.reportingComponent == "default-scheduler"
    )

    def ready_endpoint() -> list[str]:
        slices = client.list(
            EndpointSlice, namespace=namespace, labels={"kubernetes.io/service-name": "stage-0"}
        )
        return [
            address
            for s in slices
            for e in (s.endpoints or [])
            if e.conditions and e.conditions.ready
            for address in e.addresses
        ]

    addresses = wait.until(ready_endpoint, what="a ready endpoint for service stage-0")
    assert addresses == [pod.status.podIP]


def test_unsatisfiable_affinity_stays_pending_with_failed_scheduling(
    control_plane: cp.ControlPlane, small_cluster: dict[str, str], namespace: str
) -> None:
    client = control_plane.client()
    pod = Pod.from_dict(
        {
            "metadata": {"name": "nowhere"},
            "spec": {
                "affinity": hostname_affinity("no-such-node"),
                "containers": [{"name": "main", "image": "registry.invalid/x:1"}],
            },
        }
    )
    client.create(pod, namespace=namespace)

    failed = wait.event(client, namespace, involved="nowhere", reason="FailedScheduling")
    assert "affinity" in failed.message.lower() or "selector" in failed.message.lower()
    still = client.get(Pod, "nowhere", namespace=namespace)
    assert still.status.phase == "Pending"
    assert not still.spec.nodeName


def test_deleting_an_owner_garbage_collects_its_dependents(
    control_plane: cp.ControlPlane, small_cluster: dict[str, str], namespace: str
) -> None:
    client = control_plane.client()
    owner = client.create(
        ConfigMap(metadata=ObjectMeta(name="owner"), data={"a": "1"}), namespace=namespace
    )
    reference = OwnerReference(
        apiVersion="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid
    )
    client.create(
        ConfigMap(metadata=ObjectMeta(name="dependent", ownerReferences=[reference])),
        namespace=namespace,
    )
    client.create(
        deployment("gc", affinity=hostname_affinity(small_cluster["cp-cloud-1"])),
        namespace=namespace,
    )
    wait.deployment_available(client, "gc", namespace)
    (replica_set,) = client.list(ReplicaSet, namespace=namespace, labels={"app": "gc"})

    client.delete(ConfigMap, "owner", namespace=namespace)
    client.delete(Deployment, "gc", namespace=namespace)

    wait.deleted(client, ConfigMap, "dependent", namespace=namespace)
    wait.deleted(client, ReplicaSet, replica_set.metadata.name, namespace=namespace)
    wait.until(
        lambda: not list(client.list(Pod, namespace=namespace, labels={"app": "gc"})),
        what="the gc Deployment's pods to be garbage-collected",
    )


def test_server_side_apply_round_trip_with_field_manager(
    control_plane: cp.ControlPlane, namespace: str
) -> None:
    operator = control_plane.client(field_manager="llmpipe-operator")
    intruder = control_plane.client(field_manager="someone-else")

    def config(data: dict[str, str]) -> ConfigMap:
        return ConfigMap(metadata=ObjectMeta(name="plan", namespace=namespace), data=data)

    operator.apply(config({"plan.json": "{}"}))
    operator.apply(config({"plan.json": '{"stages": []}', "pipeline.json": "{}"}))
    applied = operator.get(ConfigMap, "plan", namespace=namespace)
    assert applied.data == {"plan.json": '{"stages": []}', "pipeline.json": "{}"}
    managers = {(m.manager, m.operation) for m in applied.metadata.managedFields}
    assert ("llmpipe-operator", "Apply") in managers

    with pytest.raises(ApiError) as conflict:
        intruder.apply(config({"plan.json": "stolen"}))
    assert conflict.value.status.code == 409
    assert "llmpipe-operator" in conflict.value.status.message

    intruder.apply(config({"plan.json": "taken"}), force=True)
    taken = operator.get(ConfigMap, "plan", namespace=namespace)
    assert taken.data["plan.json"] == "taken"
    owners = {m.manager for m in taken.metadata.managedFields}
    assert {"llmpipe-operator", "someone-else"} <= owners

    # Dropping a field from the operator's applied config removes it (it owns pipeline.json).
    operator.apply(config({}))
    assert "pipeline.json" not in (operator.get(ConfigMap, "plan", namespace=namespace).data or {})


def test_cordon_keeps_new_pods_off_the_node(control_plane: cp.ControlPlane, namespace: str) -> None:
    name = unique("cordon")
    control_plane.add_node(name, tier="edge", memory="4Gi")
    try:
        control_plane.cordon(name)
        client = control_plane.client()
        client.create(
            Pod.from_dict(
                {
                    "metadata": {"name": "waits"},
                    "spec": {
                        "affinity": hostname_affinity(name),
                        "containers": [{"name": "main", "image": "registry.invalid/x:1"}],
                    },
                }
            ),
            namespace=namespace,
        )
        failed = wait.event(client, namespace, involved="waits", reason="FailedScheduling")
        assert "unschedulable" in failed.message
        control_plane.cordon(name, unschedulable=False)
        pod = wait.pod_running(client, "waits", namespace)
        assert pod.spec.nodeName == name
    finally:
        control_plane.remove_node(name)


def test_not_ready_sticks_until_set_ready(control_plane: cp.ControlPlane) -> None:
    name = unique("flaky")
    control_plane.add_node(name, tier="cloud", memory="16Gi")
    client = control_plane.client()
    try:
        control_plane.set_not_ready(name)
        # kwok re-initialises nodes that are not Ready; ours must stay NotReady.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            ready = {c.type: c.status for c in client.get(Node, name).status.conditions}["Ready"]
            assert ready == "False", "kwok undid the simulated NotReady"
            time.sleep(0.5)

        def tainted() -> bool:
            taints = client.get(Node, name).spec.taints or []
            return any(t.key == "node.kubernetes.io/not-ready" for t in taints)

        wait.until(tainted, what=f"node lifecycle controller to taint {name} not-ready")
        control_plane.set_ready(name)
        wait.until(lambda: not tainted(), what=f"the not-ready taint to leave {name}")
    finally:
        control_plane.remove_node(name)


def test_removed_node_is_gone(control_plane: cp.ControlPlane) -> None:
    name = unique("gone")
    control_plane.add_node(name, tier="edge", memory="2Gi")
    control_plane.remove_node(name)
    assert name not in {n.metadata.name for n in control_plane.client().list(Node)}


def test_service_account_token_is_bound_by_rbac(
    control_plane: cp.ControlPlane, namespace: str
) -> None:
    client = control_plane.client()
    control_plane.ensure_service_account(namespace, "reader")
    client.create(
        Role.from_dict(
            {
                "metadata": {"name": "read-configmaps"},
                "rules": [
                    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}
                ],
            }
        ),
        namespace=namespace,
    )
    client.create(
        RoleBinding.from_dict(
            {
                "metadata": {"name": "reader"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "Role",
                    "name": "read-configmaps",
                },
                "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
            }
        ),
        namespace=namespace,
    )
    kubeconfig = control_plane.service_account_kubeconfig(namespace, "reader")

    allowed = control_plane.kubectl(
        "--kubeconfig", str(kubeconfig), "-n", namespace, "get", "configmaps", "-o", "name"
    )
    assert "configmap/kube-root-ca.crt" in allowed.stdout
    denied = control_plane.kubectl("--kubeconfig", str(kubeconfig), "get", "nodes", check=False)
    assert denied.returncode != 0
    assert f"system:serviceaccount:{namespace}:reader" in denied.stderr
    assert "forbidden" in denied.stderr.lower()


def required_version(module_dir: str, module: str) -> str:
    text = (REPO / "tools" / module_dir / "go.mod").read_text()
    match = re.search(rf"^\s*(?:require\s+)?{re.escape(module)} (v\S+)", text, re.MULTILINE)
    assert match, f"{module} not required in tools/{module_dir}/go.mod"
    return match.group(1)


def test_binaries_report_their_real_versions(control_plane: cp.ControlPlane) -> None:
    kubernetes = required_version("kubernetes", "k8s.io/kubernetes")
    version = json.loads(control_plane.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == kubernetes
    assert version["clientVersion"]["gitVersion"] == kubernetes

    def run(binary: str, *args: str) -> str:
        result = subprocess.run(
            [str(control_plane.bin_dir / binary), *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        return result.stdout + result.stderr

    assert kubernetes in run("kube-scheduler", "--version")
    assert kubernetes in run("kube-controller-manager", "--version")
    assert required_version("etcd", "go.etcd.io/etcd/server/v3").lstrip("v") in run(
        "etcd", "--version"
    )
    assert required_version("kwok", "sigs.k8s.io/kwok") in run("kwok", "--version")
    assert required_version("helm", "helm.sh/helm/v3") in run("helm", "version", "--short")


def test_cli_up_env_down_leaves_no_process(control_plane: cp.ControlPlane, tmp_path: Path) -> None:
    workdir = tmp_path / "cli"
    script = str(REPO / "scripts" / "control-plane")
    env = {**control_plane.env, "LLMPIPE_VENV": sys.prefix}
    up = subprocess.run(
        [script, "up", "--dir", str(workdir), "--cluster", str(SMALL_CLUSTER)],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert up.returncode == 0, up.stderr
    try:
        assert f"export KUBECONFIG={workdir / 'kubeconfig'}" in up.stdout
        assert re.search(r"ready in [0-9.]+s", up.stderr)
        second = subprocess.run(
            [script, "up", "--dir", str(workdir)],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert second.returncode == 1
        assert "already up" in second.stderr
        again = subprocess.run(
            [script, "env", "--dir", str(workdir)],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert again.stdout == up.stdout
        nodes_out = subprocess.run(
            [
                str(control_plane.bin_dir / "kubectl"),
                "--kubeconfig",
                str(workdir / "kubeconfig"),
                "get",
                "nodes",
                "-o",
                "name",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert sorted(nodes_out.stdout.split()) == [
            "node/cp-cloud-1",
            "node/cp-edge-1",
            "node/cp-edge-2",
        ]
        started = cp.ControlPlane.load(workdir)
    finally:
        down = subprocess.run(
            [script, "down", "--dir", str(workdir)],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
    assert down.returncode == 0, down.stderr
    assert not started.alive(), f"still running after down: {started.alive()}"
