"""The user's path on real nodes, end to end, with nothing simulated but the kwok node.

`helm install` of the chart as shipped: the operator runs from the operator image built
here, as a pod on a real node, reaching the API server through the `kubernetes` Service
(kube-proxy) with the chart's ServiceAccount. The real nodes get the llmpipe labels with
`kubectl label` (what examples/nodes/ scripts do); `kubectl apply` of an LLMPipeline with a
tiny random model on a hostPath under the chart's allowed prefix. The stage pod starts from
the stage image in the node's containerd, passes its startup, liveness and readiness
probes, the pipeline turns Ready, and an OpenAI completion through the endpoint Service's
ClusterIP returns the same greedy tokens as single-process `generate`. Then the node
holding the stage is cordoned: the operator re-plans onto the other real node, and the same
request returns the same tokens from there. Run with -s to see the timings.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightkube.resources.core_v1 import Pod, Service

from tests.support import nodes, real_nodes, wait

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "llmpipe"
MODELS = Path("/var/lib/llmpipe/models")
"""The chart's default `policy.allowedHostPaths`."""
PROMPTS = [[5, 17, 40, 99, 12, 7, 230], [33, 8, 150]]
MAX_NEW = [12, 9]
FAMILY = "llama-gqa"


def completion(base: str, model: str, prompt: list[int], max_tokens: int) -> list[int]:
    body = json.dumps(
        {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "return_token_ids": True,
        }
    ).encode()
    request = urllib.request.Request(
        f"{base}/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as reply:
        return list(json.loads(reply.read())["choices"][0]["token_ids"])


class UserPath:
    def __init__(self, cluster: real_nodes.RealCluster, workdir: Path) -> None:
        self.cluster = cluster
        self.plane = cluster.plane
        self.workdir = workdir
        self.tag = uuid.uuid4().hex[:6]
        self.namespace = f"nodes-path-{self.tag}"
        self.system = f"nodes-system-{self.tag}"
        self.release = f"llmpipe-{self.tag}"
        self.model_dir = MODELS / f"nodes-{self.tag}"
        self.started = time.monotonic()
        self.timings: dict[str, float] = {}

    def mark(self, what: str) -> None:
        if what in self.timings:  # the same step again (after the cordon)
            what = f"{what} (again)"
        self.timings[what] = round(time.monotonic() - self.started, 1)
        print(f"nodes path: {what} at {self.timings[what]}s")

    def run(self, *argv: str, stdin: str | None = None, timeout: float = 400) -> str:
        done = subprocess.run(
            argv,
            input=stdin,
            env={
                **self.plane.env,
                "HELM_CONFIG_HOME": str(self.workdir / "helm"),
                "HELM_CACHE_HOME": str(self.workdir / "helm"),
                "HELM_DATA_HOME": str(self.workdir / "helm"),
            },
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )
        assert done.returncode == 0, f"{argv}\n{done.stdout}\n{done.stderr}\n{self.seen()}"
        return done.stdout

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        return self.run(str(self.plane.bin_dir / "kubectl"), *args, stdin=stdin)

    def write_model(self) -> dict[str, Any]:
        from tests.dataplane import pipelines

        MODELS.mkdir(parents=True, exist_ok=True)
        for path in (MODELS.parent, MODELS):
            path.chmod(0o755)
        pipelines.write_family(self.model_dir, FAMILY)
        # safetensors writes its files 0600: the stage (uid 10001) would refuse them, naming
        # this very command (a user's model directory needs the same).
        subprocess.run(["chmod", "-R", "a+rX", str(self.model_dir)], check=True)
        config = json.loads((self.model_dir / "config.json").read_text())
        keys = (
            "model_type",
            "num_hidden_layers",
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
            "max_position_embeddings",
            "tie_word_embeddings",
        )
        return {key: config[key] for key in keys if key in config}

    def label_nodes(self) -> None:
        for node in self.cluster.nodes:
            self.kubectl(
                "label",
                "node",
                node.name,
                "--overwrite",
                "llmpipe.io/tier=edge",
                "llmpipe.io/tflops=1",
                f"test.llmpipe.io/nodes-path={self.tag}",
            )

    def helm_install(self) -> None:
        self.run(
            str(self.plane.bin_dir / "helm"),
            "install",
            self.release,
            str(CHART),
            "--namespace",
            self.system,
            "--set",
            f"watch.namespaces={{{self.namespace}}}",
            # A real node, not the kwok one: the operator must really run.
            "--set-string",
            f"nodeSelector.{nodes.REAL_NODE_LABEL.replace('.', chr(92) + '.')}=true",
            "--wait",
            "--timeout",
            "300s",
        )

    def apply_pipeline(self, config: dict[str, Any]) -> str:
        name = "tiny"
        doc = {
            "apiVersion": "llmpipe.io/v1alpha1",
            "kind": "LLMPipeline",
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": {
                "model": {
                    "name": "tiny-llama",
                    "source": {"hostPath": {"path": str(self.model_dir)}},
                    "config": config,
                    "dtype": "float32",
                },
                "placement": {"nodeSelector": {"test.llmpipe.io/nodes-path": self.tag}},
                "runtime": {
                    "image": self.cluster.image["STAGE_IMAGE"],
                    "runtimeOverhead": "512Mi",
                },
                "workload": {"maxSequences": 2, "maxContextTokens": 256},
            },
        }
        self.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(doc))
        return name

    def pipeline(self, name: str) -> dict[str, Any]:
        return dict(
            json.loads(self.kubectl("get", "llmp", name, "-n", self.namespace, "-o", "json"))
        )

    def seen(self) -> str:
        try:
            pods = self.plane.client().list(Pod, namespace=self.namespace)
            described = "\n".join(wait.pod_summary(p) for p in pods)
            operator = self.plane.kubectl(
                "logs", "-n", self.system, f"deploy/{self.release}", "--tail=30", check=False
            )
            return f"pods:\n{described}\noperator log:\n{operator.stdout}{operator.stderr}"
        except Exception as error:  # noqa: BLE001 - only a failure message
            return f"(could not describe: {error})"

    def ready(self, name: str, *, unlike: str | None = None, timeout: float = 900) -> dict:
        """Wait for phase Ready (on a plan whose stage 0 is not on `unlike`)."""

        def check() -> dict[str, Any] | None:
            status = self.pipeline(name).get("status", {})
            stages = status.get("plan", {}).get("stages", [])
            if status.get("phase") != "Ready" or not stages:
                return None
            if unlike is not None and any(s["node"] == unlike for s in stages):
                return None
            return status

        def seen() -> str:
            status = json.dumps(self.pipeline(name).get("status", {}))[:1500]
            return f"status={status}\n{self.seen()}"

        return wait.until(check, what=f"llmp {name} Ready", timeout=timeout, seen=seen, interval=2)

    def api_base(self, status: dict[str, Any]) -> str:
        """The endpoint Service's ClusterIP (the status names its DNS name, which only the
        cluster DNS resolves): reached from this host through kube-proxy's rules."""
        endpoint = status["endpoint"]  # http://<service>.<namespace>.svc:<port>/v1
        host, port = endpoint.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
        service, namespace = host.split(".")[:2]
        ip = self.plane.client().get(Service, service, namespace=namespace).spec.clusterIP
        return f"http://{ip}:{port}/v1"

    def wait_routed(self, base: str) -> None:
        """Phase Ready can come a moment before kube-proxy routes the Service to the ready
        pod (EndpointSlice, then an iptables sync): until then the ClusterIP refuses
        connections. A client retries; so does this, for up to a minute."""

        def answers() -> bool:
            try:
                with urllib.request.urlopen(f"{base}/models", timeout=10) as reply:
                    return bool(reply.status == 200)
            except OSError:
                return False

        wait.until(answers, what=f"{base}/models to answer", timeout=60, interval=1)
        self.mark("the endpoint Service answers")

    def stop(self) -> None:
        self.plane.kubectl("delete", "llmp", "--all", "-n", self.namespace, check=False)
        self.plane.kubectl("delete", "namespace", self.namespace, "--wait=false", check=False)
        helm = str(self.plane.bin_dir / "helm")
        subprocess.run(
            [helm, "uninstall", self.release, "--namespace", self.system, "--wait"],
            env=self.plane.env,
            capture_output=True,
            timeout=180,
            check=False,
        )
        for node in self.cluster.nodes:
            self.plane.cordon(node.name, unschedulable=False)
        shutil.rmtree(self.model_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def path(
    real_cluster: real_nodes.RealCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[UserPath]:
    made = UserPath(real_cluster, tmp_path_factory.mktemp("nodes-path"))
    real_cluster.plane.create_namespace(made.namespace)
    real_cluster.plane.create_namespace(made.system)
    try:
        yield made
    finally:
        made.stop()
        real_cluster.plane.delete_namespace(made.system)


# Importing torch from the 7 GB stage image with a cold page cache takes minutes on a loaded
# 2-core machine; the waits return as soon as the pipeline is Ready.
@pytest.mark.timeout(2400)
def test_pipeline_serves_from_real_nodes_and_moves_when_its_node_is_cordoned(
    path: UserPath,
) -> None:
    from tests.dataplane import pipelines

    config = path.write_model()
    expected = pipelines.reference_tokens(path.model_dir, PROMPTS, MAX_NEW)
    path.mark("model written, reference tokens from generate")
    path.label_nodes()
    path.helm_install()
    path.mark("helm install --wait: the operator pod Ready on a real node")
    operator_pods = path.plane.client().list(Pod, namespace=path.system)
    real = {n.name for n in path.cluster.nodes}
    assert {p.spec.nodeName for p in operator_pods} <= real

    name = path.apply_pipeline(config)
    status = path.ready(name)
    path.mark("pipeline Ready")
    first = status["plan"]["stages"][0]["node"]
    assert {s["node"] for s in status["plan"]["stages"]} <= real
    for pod in path.plane.client().list(Pod, namespace=path.namespace):
        assert pod.spec.nodeName in real
        # Pods a kubelet evicted (disk pressure on a shared machine) stay listed, Failed.
        if pod.status.phase == "Running":
            assert all(c.ready for c in pod.status.containerStatuses or [])
    base = path.api_base(status)
    path.wait_routed(base)
    got = [completion(base, "tiny-llama", p, n) for p, n in zip(PROMPTS, MAX_NEW, strict=True)]
    assert got == expected
    path.mark(f"OpenAI completions through the Service equal generate (stage 0 on {first})")

    path.plane.cordon(first)
    moved = path.ready(name, unlike=first)
    path.mark("re-planned and Ready on the other real node after the cordon")
    assert {s["node"] for s in moved["plan"]["stages"]} <= real - {first}
    base = path.api_base(moved)
    path.wait_routed(base)
    again = [completion(base, "tiny-llama", p, n) for p, n in zip(PROMPTS, MAX_NEW, strict=True)]
    assert again == expected
    path.mark("serving again, same tokens")
    print(f"nodes path timings: {path.timings}")
