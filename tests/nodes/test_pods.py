"""Real nodes run pods: the images built here start under a real kubelet, pods reach each
other across nodes through a Service by its DNS name, and `kubectl logs` reads them.

What the stage pods the operator renders rely on, checked one piece at a time (the
pipeline test, test_pipeline.py, then runs them all together).
"""

from __future__ import annotations

from typing import Any

from lightkube.resources.core_v1 import Node, Pod, Service

from tests.support import nodes, real_nodes, wait

RESTRICTED = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def pod(name: str, image: str, node: str, command: list[str], **extra: Any) -> dict[str, Any]:
    """A restricted pod pinned to `node`, as the operator renders its stages."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "nodeName": node,
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "containers": [
                {
                    "name": "main",
                    "image": image,
                    "imagePullPolicy": "Never",
                    "command": command,
                    "securityContext": RESTRICTED,
                    **extra,
                }
            ],
        },
    }


def run_to_completion(cluster: real_nodes.RealCluster, namespace: str, manifest: dict) -> str:
    """Create the pod, wait until it Succeeded, return `kubectl logs` (through the kubelet)."""
    client = cluster.plane.client()
    client.create(Pod.from_dict(manifest), namespace=namespace)  # type: ignore[call-overload]
    name = manifest["metadata"]["name"]

    def finished() -> Pod | None:
        found = client.get(Pod, name, namespace=namespace)
        phase = found.status.phase if found.status else None
        assert phase != "Failed", f"{name} failed: {wait.pod_summary(found)}\n{logs(name)}"
        return found if phase == "Succeeded" else None

    def logs(pod_name: str) -> str:
        return cluster.plane.kubectl("logs", "-n", namespace, pod_name, check=False).stdout

    wait.until(finished, what=f"pod {name} Succeeded", timeout=180)
    return cluster.plane.kubectl("logs", "-n", namespace, name).stdout


def test_real_nodes_are_ready_beside_a_kwok_node(real_cluster: real_nodes.RealCluster) -> None:
    listed = {n.metadata.name: n for n in real_cluster.plane.client().list(Node)}
    assert set(listed) == {*(n.name for n in real_cluster.nodes), real_cluster.kwok_node}
    for node in real_cluster.nodes:
        got = listed[node.name]
        assert got.metadata.labels[nodes.REAL_NODE_LABEL] == "true"
        assert got.status.nodeInfo.containerRuntimeVersion.startswith("containerd://")
        assert got.status.nodeInfo.kubeletVersion.startswith("v1.")
        addresses = {a.type: a.address for a in got.status.addresses}
        assert addresses["InternalIP"] == node.node_ip
    kwok = listed[real_cluster.kwok_node]
    assert nodes.REAL_NODE_LABEL not in (kwok.metadata.labels or {})


def test_stage_image_runs_as_10001_with_a_read_only_root(
    real_cluster: real_nodes.RealCluster, namespace: str
) -> None:
    script = (
        "id -u; python -m llmpipe_stage --help | grep -q -- --stage-index && echo help-ok; "
        "touch /probe 2>/dev/null && echo root-writable || echo root-read-only"
    )
    manifest = pod(
        "stage-help",
        real_cluster.image["STAGE_IMAGE"],
        real_cluster.nodes[0].name,
        ["sh", "-c", script],
    )
    assert run_to_completion(real_cluster, namespace, manifest).split() == [
        "10001",
        "help-ok",
        "root-read-only",
    ]


def test_operator_image_has_no_torch(real_cluster: real_nodes.RealCluster, namespace: str) -> None:
    check = (
        "import importlib.util as u; "
        "print(u.find_spec('torch') is None, u.find_spec('llmpipe_operator') is not None)"
    )
    manifest = pod(
        "operator-image",
        real_cluster.image["OPERATOR_IMAGE"],
        real_cluster.nodes[1].name,
        ["python", "-c", check],
    )
    assert run_to_completion(real_cluster, namespace, manifest).split() == ["True", "True"]


def test_a_pod_reaches_a_service_on_the_other_node_by_name(
    real_cluster: real_nodes.RealCluster, namespace: str
) -> None:
    client = real_cluster.plane.client()
    image = real_cluster.image["STAGE_IMAGE"]
    server, other = real_cluster.nodes[0].name, real_cluster.nodes[1].name
    web = pod(
        "web",
        image,
        server,
        ["python", "-m", "http.server", "8080", "--directory", "/etc"],
        ports=[{"name": "http", "containerPort": 8080}],
        readinessProbe={"httpGet": {"path": "/hostname", "port": "http"}, "periodSeconds": 1},
    )
    client.create(Pod.from_dict(web), namespace=namespace)  # type: ignore[call-overload]
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]},
    }
    client.create(Service.from_dict(service), namespace=namespace)  # type: ignore[call-overload]
    wait.until(
        lambda: (
            (p := client.get(Pod, "web", namespace=namespace)).status
            and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
        ),
        what="pod web Ready (its readiness probe passed)",
        timeout=120,
    )
    # Ready comes a moment before kube-proxy has synced the new Service's rules (the
    # EndpointSlice, then an iptables sync): until then the ClusterIP refuses connections.
    # The client retries for up to a minute, as a client would; it fails if never routed.
    url = f"http://web.{namespace}.svc/hostname"
    fetch = (
        "import time, urllib.request\n"
        "for attempt in range(60):\n"
        "    try:\n"
        f"        print(urllib.request.urlopen({url!r}, timeout=10).read().decode().strip())\n"
        "        break\n"
        "    except OSError:\n"
        "        time.sleep(1)\n"
        "else:\n"
        f"    raise SystemExit({url!r} + ' never answered')\n"
    )
    client_pod = pod("client", image, other, ["python", "-c", fetch])
    assert run_to_completion(real_cluster, namespace, client_pod).strip() == "web"
