"""The README's path on a simulated K3s cluster: helm install, label nodes, apply examples.

Covers, with nothing mocked but the nodes (kwok): `helm install` into a namespace of its own,
scoped to one other namespace; the operator as a real process authenticated as the
ServiceAccount the chart created and reading the policy ConfigMap the chart created (so it
works with exactly the chart's RBAC and default policy, and the examples pass that policy's
admission); nodes described only by running
examples/nodes/label-k3s-edge-cloud.sh (node names prefixed for this test); the three
example pipelines applied as shipped (plus a selector label that keeps other tests' nodes
out); each becomes Ready with its stages where the example promises (privacy: stage 0 on
an edge node; edge-only: edge nodes; cloud: cloud nodes), and `kubectl get llmp` shows the
printer columns. The output is printed for the README (run with -s to see it).
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightkube.resources.core_v1 import Node

from tests.support import control_plane as cp
from tests.support import nodes, wait

REPO = Path(__file__).resolve().parents[3]
CHART = REPO / "helm" / "llmpipe"
NODES = REPO / "examples" / "nodes"
PIPELINES = REPO / "examples" / "pipelines"
RUN_LABEL = "test.llmpipe.io/user-path"


def run(plane: cp.ControlPlane, argv: list[str], **extra: Any) -> str:
    done = subprocess.run(
        argv,
        env={**plane.env, **extra.pop("env", {})},
        capture_output=True,
        text=True,
        check=False,
        timeout=180,
        **extra,
    )
    assert done.returncode == 0, f"{argv}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


class Cluster:
    """This test's namespace, release, nodes (by their names in the example) and operator."""

    def __init__(self, plane: cp.ControlPlane, workdir: Path) -> None:
        self.plane = plane
        self.workdir = workdir
        self.tag = uuid.uuid4().hex[:6]
        self.namespace = f"user-path-{self.tag}"
        self.system = f"user-path-system-{self.tag}"
        self.release = f"llmpipe-{self.tag}"
        self.names = {n["name"]: f"up{self.tag}-{n['name']}" for n in self.cluster_file()["nodes"]}
        self.operator: subprocess.Popen[bytes] | None = None

    def cluster_file(self) -> dict[str, Any]:
        return yaml.safe_load((NODES / "k3s-edge-cloud.cluster.yaml").read_text())

    def add_unlabelled_nodes(self) -> None:
        """Nodes with the example's memory and llmpipe's defaults, before the script runs;
        the GPU nodes with what GPU Feature Discovery and the device plugin put there (the
        file's nvidia.com labels, allocatable nvidia.com/gpu), and the `nvidia`
        RuntimeClass that K3s creates when it finds the NVIDIA container runtime."""
        for node in self.cluster_file()["nodes"]:
            gfd = {
                k: v for k, v in (node.get("labels") or {}).items() if k.startswith("nvidia.com/")
            }
            spec = nodes.NodeSpec(
                name=self.names[node["name"]],
                memory=node["memory"],
                labels={RUN_LABEL: self.tag, **gfd},
            )
            self.plane.add_node(spec)
        runtime_class = {
            "apiVersion": "node.k8s.io/v1",
            "kind": "RuntimeClass",
            "metadata": {"name": "nvidia"},
            "handler": "nvidia",
        }
        run(
            self.plane,
            [str(self.plane.bin_dir / "kubectl"), "apply", "-f", "-"],
            input=json.dumps(runtime_class),
        )

    def run_label_script(self) -> None:
        script = (NODES / "label-k3s-edge-cloud.sh").read_text()
        for name in sorted(self.names, key=len, reverse=True):
            script = script.replace(name, self.names[name])
        path = self.workdir / "label.sh"
        path.write_text(script)
        run(self.plane, ["bash", str(path)])

    def helm_install(self) -> None:
        run(
            self.plane,
            [
                str(self.plane.bin_dir / "helm"),
                "install",
                self.release,
                str(CHART),
                "--namespace",
                self.system,
                "--set",
                f"watch.namespaces={{{self.namespace}}}",
                "--set-string",
                f"nodeSelector.kubernetes\\.io/hostname={self.names['gpu-1']}",
                "--wait",
                "--timeout",
                "120s",
            ],
            env={
                "HELM_CONFIG_HOME": str(self.workdir / "helm"),
                "HELM_CACHE_HOME": str(self.workdir / "helm"),
                "HELM_DATA_HOME": str(self.workdir / "helm"),
            },
        )

    def start_operator(self) -> None:
        """The operator process, as the ServiceAccount `helm install` created, with the policy
        file the chart's ConfigMap holds (what its Deployment mounts)."""
        kubeconfig = self.plane.service_account_kubeconfig(
            self.system, self.release, path=self.workdir / "operator.kubeconfig"
        )
        policy = self.workdir / "policy.json"
        policy.write_text(
            run(
                self.plane,
                [
                    *(str(self.plane.bin_dir / "kubectl"), "get", "configmap", "-n", self.system),
                    *(f"{self.release}-policy", "-o", "jsonpath={.data.policy\\.json}"),
                ],
            )
        )
        port = cp.free_port()
        argv = [
            sys.executable,
            "-m",
            "llmpipe_operator",
            "--namespace",
            self.namespace,
            "--health-port",
            str(port),
            "--metrics-port",
            "0",
            "--policy",
            str(policy),
        ]
        env = {
            **self.plane.env,
            "KUBECONFIG": str(kubeconfig),
            "PYTHONPATH": f"{REPO}:{REPO / 'operator'}",
            "PYTHONUNBUFFERED": "1",
        }
        with (self.workdir / "operator.log").open("wb") as log:
            self.operator = subprocess.Popen(
                argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO
            )
        wait.until(
            lambda: self.operator is not None and self.operator.poll() is None and _healthy(port),
            what="the operator's /healthz",
            timeout=60,
            seen=self.operator_log,
        )

    def operator_log(self) -> str:
        path = self.workdir / "operator.log"
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        return "\n".join(lines[-40:])

    def stop(self) -> None:
        if self.operator is not None and self.operator.poll() is None:
            self.operator.send_signal(signal.SIGTERM)
            try:
                self.operator.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.operator.kill()
                self.operator.wait(timeout=5)
        run_quiet = {"env": self.plane.env, "capture_output": True, "timeout": 120}
        subprocess.run(
            [
                str(self.plane.bin_dir / "helm"),
                "uninstall",
                self.release,
                "--namespace",
                self.system,
                "--wait",
            ],
            check=False,
            **run_quiet,
        )
        for name in self.names.values():
            with contextlib.suppress(Exception):
                self.plane.remove_node(name)

    def apply_example(self, file: str) -> str:
        """The example as shipped, plus our run label in its nodeSelector."""
        doc = yaml.safe_load((PIPELINES / file).read_text())
        placement = doc["spec"].setdefault("placement", {})
        placement.setdefault("nodeSelector", {})[RUN_LABEL] = self.tag
        run(
            self.plane,
            [str(self.plane.bin_dir / "kubectl"), "apply", "-n", self.namespace, "-f", "-"],
            input=yaml.safe_dump(doc),
        )
        return str(doc["metadata"]["name"])

    def models_volume(self) -> None:
        """The ReadOnlyMany claim `models` that cloud-throughput.yaml reads, statically bound."""
        pv = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": f"models-{self.tag}"},
            "spec": {
                "capacity": {"storage": "100Gi"},
                "accessModes": ["ReadOnlyMany"],
                "hostPath": {"path": "/srv/models"},
                "storageClassName": "",
                "claimRef": {"namespace": self.namespace, "name": "models"},
            },
        }
        pvc = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "models", "namespace": self.namespace},
            "spec": {
                "accessModes": ["ReadOnlyMany"],
                "storageClassName": "",
                "volumeName": f"models-{self.tag}",
                "resources": {"requests": {"storage": "100Gi"}},
            },
        }
        run(
            self.plane,
            [str(self.plane.bin_dir / "kubectl"), "apply", "-f", "-"],
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [pv, pvc]}),
        )

    def pipeline(self, name: str) -> dict[str, Any]:
        out = run(
            self.plane,
            [
                str(self.plane.bin_dir / "kubectl"),
                "get",
                "llmp",
                name,
                "-n",
                self.namespace,
                "-o",
                "json",
            ],
        )
        return dict(json.loads(out))

    def ready(self, name: str, *, timeout: float = 120) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            obj = self.pipeline(name)
            return obj if obj.get("status", {}).get("phase") == "Ready" else None

        def seen() -> str:
            status = self.pipeline(name).get("status", {})
            return f"status={json.dumps(status)[:1500]}\noperator log:\n{self.operator_log()}"

        return wait.until(check, what=f"llmp {name} Ready", timeout=timeout, seen=seen)


@pytest.fixture(scope="module")
def cluster(
    control_plane: cp.ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    made = Cluster(control_plane, tmp_path_factory.mktemp("user-path"))
    control_plane.create_namespace(made.namespace)
    control_plane.create_namespace(made.system)
    try:
        yield made
    finally:
        made.stop()
        control_plane.delete_namespace(made.namespace)
        control_plane.delete_namespace(made.system)
        control_plane.kubectl(
            "delete", "pv", f"models-{made.tag}", "--ignore-not-found", "--wait=false", check=False
        )


def test_label_script_describes_the_nodes(cluster: Cluster) -> None:
    cluster.add_unlabelled_nodes()
    cluster.run_label_script()
    client = cluster.plane.client()
    expected = {n["name"]: n for n in cluster.cluster_file()["nodes"]}
    for short, full in cluster.names.items():
        node = client.get(Node, full)
        labels = node.metadata.labels
        assert labels["llmpipe.io/tier"] == expected[short]["tier"]
        assert float(labels["llmpipe.io/tflops"]) == float(expected[short]["tflops"])
    links = json.loads(
        client.get(Node, cluster.names["jetson-1"]).metadata.annotations["llmpipe.io/links"]
    )
    assert links[cluster.names["gpu-1"]] == {"mbps": 40, "rttMs": 35}


def test_helm_install_and_operator_run_as_the_chart_account(cluster: Cluster) -> None:
    cluster.helm_install()
    cluster.start_operator()


def test_examples_become_ready_where_they_promise(cluster: Cluster) -> None:
    cluster.models_volume()
    names = {
        file: cluster.apply_example(file)
        for file in ("edge-cloud-privacy.yaml", "edge-only.yaml", "cloud-throughput.yaml")
    }
    tiers = {cluster.names[n["name"]]: n["tier"] for n in cluster.cluster_file()["nodes"]}
    status = {file: cluster.ready(name)["status"] for file, name in names.items()}
    privacy = status["edge-cloud-privacy.yaml"]["plan"]["stages"]
    assert tiers[privacy[0]["node"]] == "edge"
    assert {tiers[s["node"]] for s in privacy[1:]} == {"cloud"}, "edge + cloud, as commented"
    edge_only = status["edge-only.yaml"]["plan"]["stages"]
    assert {tiers[s["node"]] for s in edge_only} == {"edge"}
    cloud = status["cloud-throughput.yaml"]["plan"]["stages"]
    assert {tiers[s["node"]] for s in cloud} == {"cloud"}
    assert {(s["device"], s["gpus"]) for s in cloud} == {("cuda", 1)}, "on the L4s"
    gpu_pods = json.loads(
        run(
            cluster.plane,
            [
                *(str(cluster.plane.bin_dir / "kubectl"), "get", "pods", "-n", cluster.namespace),
                *("-l", "llmpipe.io/pipeline=qwen7b-batch", "-o", "json"),
            ],
        )
    )["items"]
    assert len(gpu_pods) == len(cloud)
    for pod in gpu_pods:
        (container,) = pod["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert pod["spec"]["runtimeClassName"] == "nvidia"
    for state in status.values():
        assert state["ready"] == f"{state['stageCount']}/{state['stageCount']}"
        assert state["endpoint"].startswith("http://")
    table = run(
        cluster.plane,
        [str(cluster.plane.bin_dir / "kubectl"), "get", "llmp", "-n", cluster.namespace],
    )
    header = table.splitlines()[0].split()
    assert header == [
        *("NAME", "PHASE", "STAGES", "BOTTLENECK", "EST", "TOK/S", "MEASURED", "TOK/S"),
        *("READY", "AGE"),
    ]
    print("\n$ kubectl get llmp\n" + table)
    wide = run(
        cluster.plane,
        [
            str(cluster.plane.bin_dir / "kubectl"),
            "get",
            "pods",
            "-n",
            cluster.namespace,
            "-o",
            "wide",
        ],
    )
    print("$ kubectl get pods -o wide\n" + wide)


def test_readme_troubleshooting_commands_work(cluster: Cluster) -> None:
    kubectl = [str(cluster.plane.bin_dir / "kubectl"), "-n", cluster.namespace]
    selector = "llmpipe.io/pipeline=tinyllama-private"
    pods = run(cluster.plane, [*kubectl, "get", "pods", "-l", selector, "-o", "wide"])
    assert len(pods.splitlines()) == 1 + 3
    plan_json = run(
        cluster.plane,
        [*kubectl, "get", "cm", "-l", selector, "-o", "jsonpath={.items[*].data.plan\\.json}"],
    )
    plan = json.loads(plan_json)
    assert [s["index"] for s in plan["stages"]] == [0, 1, 2]
    assert all("computeSeconds" in s and "transferSeconds" in s for s in plan["stages"])


def test_infeasible_example_says_what_is_short(cluster: Cluster) -> None:
    doc = yaml.safe_load((PIPELINES / "cloud-throughput.yaml").read_text())
    doc["metadata"]["name"] = "qwen7b-too-big"
    doc["spec"]["workload"]["maxSequences"] = 256
    doc["spec"]["placement"]["nodeSelector"][RUN_LABEL] = cluster.tag
    kubectl = [str(cluster.plane.bin_dir / "kubectl"), "-n", cluster.namespace]
    run(cluster.plane, [*kubectl, "apply", "-f", "-"], input=yaml.safe_dump(doc))

    def planned_false() -> dict[str, Any] | None:
        status = cluster.pipeline("qwen7b-too-big").get("status", {})
        conditions = {c["type"]: c for c in status.get("conditions", [])}
        planned = conditions.get("Planned", {})
        return status if planned.get("status") == "False" else None

    status = wait.until(planned_false, what="Planned=False", timeout=60)
    planned = next(c for c in status["conditions"] if c["type"] == "Planned")
    assert planned["reason"] == "InsufficientMemory"
    assert status["phase"] == "Failed"
    assert "short" in planned["message"]
    pods = run(cluster.plane, [*kubectl, "get", "pods", "-l", "llmpipe.io/pipeline=qwen7b-too-big"])
    assert pods == ""  # nothing half-deployed
    table = run(cluster.plane, [*kubectl, "get", "llmp", "qwen7b-too-big"])
    # The README's command for the message.
    jsonpath = '{.status.conditions[?(@.type=="Planned")].message}'
    message = run(
        cluster.plane, [*kubectl, "get", "llmp", "qwen7b-too-big", "-o", f"jsonpath={jsonpath}"]
    )
    assert message == planned["message"]
    print("\n$ kubectl get llmp qwen7b-too-big\n" + table + "message: " + planned["message"])
