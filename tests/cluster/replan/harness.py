"""A lab for re-planning on the real control plane: the operator as a process, simulated
nodes of one test's own group, pipelines, and what to read back (status, pods, Events,
EndpointSlices, the operator's /metrics).

Shared by tests/cluster/replan and bench/replan.py. Nodes carry the label
`test.llmpipe.io/group=<group>` and the pipelines select it, so pipelines never plan onto
nodes other tests left in the shared control plane.
"""

from __future__ import annotations

import contextlib
import copy
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from lightkube import ApiError
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import ConfigMap, Event, Pod, Service
from lightkube.resources.discovery_v1 import EndpointSlice
from lightkube.types import PatchType

from tests.support import control_plane as cp
from tests.support import nodes as node_support
from tests.support import wait
from tests.support.models import TINY_LLAMA_CONFIG

ROOT = Path(__file__).resolve().parents[3]
CRD = ROOT / "crds" / "llmpipeline.yaml"
GROUP_LABEL = "test.llmpipe.io/group"

LLMPipeline = create_namespaced_resource(
    "llmpipe.io", "v1alpha1", "LLMPipeline", "llmpipelines", verbs=None
)


def apply_crd(plane: cp.ControlPlane) -> None:
    plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    plane.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/llmpipelines.llmpipe.io"
    )


@dataclass
class OperatorProcess:
    """`python -m llmpipe_operator --namespace NS` with its health and metrics ports, run as
    the chart's ServiceAccount under the chart's RBAC (rendered by the real helm), never as
    admin: the re-planner's node watch and metrics.k8s.io reads need those permissions."""

    process: subprocess.Popen[bytes]
    health_port: int
    metrics_port: int
    log_path: Path
    plane: cp.ControlPlane
    cluster_objects: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, plane: cp.ControlPlane, namespace: str, log_path: Path) -> OperatorProcess:
        kubeconfig, cluster_objects = _operator_account(plane, namespace, log_path.parent)
        health, metrics = cp.free_port(), cp.free_port()
        env = {
            **plane.env,
            "KUBECONFIG": str(kubeconfig),
            "PYTHONPATH": f"{ROOT}:{ROOT / 'operator'}",
            "PYTHONUNBUFFERED": "1",
        }
        argv = [sys.executable, "-m", "llmpipe_operator", "--namespace", namespace,
                "--health-port", str(health), "--metrics-port", str(metrics)]  # fmt: skip
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
            )
        operator = cls(process, health, metrics, log_path, plane, cluster_objects)
        wait.until(
            operator.healthy, what="the operator's /healthz", timeout=60, seen=operator.log_tail
        )
        return operator

    def get(self, port: int, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def healthy(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"the operator exited: {self.log_tail()}")
        with contextlib.suppress(OSError):
            return self.get(self.health_port, "/healthz")[0] == 200
        return False

    def metrics(self) -> str:
        status, text = self.get(self.metrics_port, "/metrics")
        assert status == 200, text
        return text

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        for obj in self.cluster_objects:
            self.plane.kubectl("delete", "--ignore-not-found", obj, check=False)


def _operator_account(
    plane: cp.ControlPlane, namespace: str, workdir: Path
) -> tuple[Path, list[str]]:
    """Apply the chart's ServiceAccount (in a release namespace of its own) and RBAC for
    `namespace`; a kubeconfig acting as it. The namespace is listed with the cluster objects
    so that stopping the operator removes it."""
    from tests.cluster.operator.conftest import operator_release_namespace, render_rbac

    home = operator_release_namespace(plane)
    docs = render_rbac(
        plane, release=f"llmpipe-{uuid.uuid4().hex[:6]}", namespace=home, watch=[namespace]
    )
    manifest = workdir / f"rbac-{namespace}.yaml"
    manifest.write_text(yaml.safe_dump_all(docs))
    plane.kubectl("apply", "-f", str(manifest))
    (account,) = [d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"]
    kubeconfig = _service_account_kubeconfig(
        plane, home, account, workdir / f"operator-{namespace}.kubeconfig"
    )
    cluster = [
        f"{d['kind'].lower()}/{d['metadata']['name']}"
        for d in docs
        if d["kind"] in ("ClusterRole", "ClusterRoleBinding")
    ]
    return kubeconfig, [*cluster, f"namespace/{home}"]


@dataclass
class Lab:
    plane: cp.ControlPlane
    namespace: str
    group: str
    workdir: Path
    nodes: list[str] = field(default_factory=list)

    @property
    def client(self) -> Any:
        return self.plane.client()

    # -- nodes ---------------------------------------------------------------------------

    def add_node(self, short: str, **fields: Any) -> str:
        """A simulated node of this lab's group; returns its full name."""
        name = f"{self.group}-{short}"
        labels = {GROUP_LABEL: self.group, **fields.pop("labels", {})}
        self.plane.add_node(node_support.NodeSpec(name=name, labels=labels, **fields))
        self.nodes.append(name)
        return name

    def label_node(self, name: str, key: str, value: str | None) -> None:
        from lightkube.resources.core_v1 import Node

        self.client.patch(
            Node, name, {"metadata": {"labels": {key: value}}}, patch_type=PatchType.MERGE
        )

    def remove_nodes(self) -> None:
        for name in self.nodes:
            with contextlib.suppress(ApiError, wait.WaitTimeout):
                self.plane.remove_node(name)

    # -- pipelines -----------------------------------------------------------------------

    def apply_pipeline(self, name: str, **spec: Any) -> dict[str, Any]:
        body = {
            "apiVersion": "llmpipe.io/v1alpha1",
            "kind": "LLMPipeline",
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": {
                "model": {
                    "name": "tiny-llama",
                    "source": {"hostPath": {"path": "/var/lib/llmpipe/models/tiny"}},
                    "config": copy.deepcopy(TINY_LLAMA_CONFIG),
                },
                "placement": {"nodeSelector": {GROUP_LABEL: self.group}},
                "workload": {"maxSequences": 4, "maxContextTokens": 512},
                "runtime": {"runtimeOverhead": "16Mi"},
            },
        }
        for key, value in spec.items():
            body["spec"].setdefault(key, {}).update(value)
        obj = self.client.create(LLMPipeline(body), namespace=self.namespace)
        return dict(obj.to_dict())

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.client.patch(
            LLMPipeline, name, {"spec": spec}, namespace=self.namespace, patch_type=PatchType.MERGE
        )

    def pipeline(self, name: str) -> dict[str, Any]:
        return dict(self.client.get(LLMPipeline, name, namespace=self.namespace).to_dict())

    def status(self, name: str) -> dict[str, Any]:
        return dict(self.pipeline(name).get("status") or {})

    def wait_status(
        self, name: str, check: Callable[[dict[str, Any]], Any], *, what: str, timeout: float = 60
    ) -> dict[str, Any]:
        def ok() -> dict[str, Any] | None:
            st = self.status(name)
            return st if check(st) else None

        return wait.until(
            ok, what=f"{name}: {what}", timeout=timeout, seen=lambda: _brief(self.status(name))
        )

    def wait_ready(self, name: str, *, timeout: float = 60) -> dict[str, Any]:
        """Ready: every stage of the plan available and the endpoint routing to it."""
        return self.wait_status(
            name,
            lambda st: (
                st.get("phase") == "Ready"
                and st.get("planHash")
                and st.get("planHash") == st.get("servingPlanHash")
            ),
            what="phase Ready on its plan",
            timeout=timeout,
        )

    def planned_nodes(self, st: dict[str, Any]) -> list[str]:
        return [s["node"] for s in (st.get("plan") or {}).get("stages", [])]

    def stage_pods(self, name: str, digest: str) -> list[Pod]:
        labels = {"llmpipe.io/pipeline": name, "llmpipe.io/plan-hash": digest}
        return list(self.client.list(Pod, namespace=self.namespace, labels=labels))

    def plan_objects(self, name: str, digest: str) -> list[str]:
        """Kind/name of the Deployments, Services and ConfigMaps of one plan hash."""
        labels = {"llmpipe.io/pipeline": name, "llmpipe.io/plan-hash": digest}
        return [
            f"{kind.__name__}/{obj.metadata.name}"
            for kind in (Deployment, Service, ConfigMap)
            for obj in self.client.list(kind, namespace=self.namespace, labels=labels)
        ]

    def wait_pods_running(self, name: str, st: dict[str, Any], *, timeout: float = 60) -> list[Pod]:
        """The plan's stage pods Running, each on its planned node; returns them."""
        want = {int(s["index"]): s["node"] for s in st["plan"]["stages"]}

        def check() -> list[Pod] | None:
            pods = self.stage_pods(name, st["planHash"])
            on = {
                int(p.metadata.labels["llmpipe.io/stage-index"]): p.spec.nodeName
                for p in pods
                if p.status.phase == "Running" and p.metadata.deletionTimestamp is None
            }
            return pods if on == want else None

        return wait.until(
            check,
            what=f"{name}: stage pods Running on {want}",
            timeout=timeout,
            seen=lambda: ", ".join(
                wait.pod_summary(p) for p in self.stage_pods(name, st["planHash"])
            ),
        )

    def events(self, name: str) -> list[Event]:
        return [
            e
            for e in self.client.list(Event, namespace=self.namespace)
            if e.involvedObject.name == name and e.involvedObject.kind == "LLMPipeline"
        ]

    def ready_endpoints(self, service: str) -> int:
        slices = self.client.list(
            EndpointSlice,
            namespace=self.namespace,
            labels={"kubernetes.io/service-name": service},
        )
        return sum(
            1
            for s in slices
            for ep in s.endpoints or []
            if ep.conditions is not None and ep.conditions.ready
        )


def _brief(st: dict[str, Any]) -> str:
    replan = st.get("replan") or {}
    conds = "; ".join(
        f"{c.get('type')}={c.get('status')} {c.get('reason')}: {c.get('message')}"
        for c in st.get("conditions") or []
    )
    return (
        f"phase={st.get('phase')} planHash={st.get('planHash')} "
        f"serving={st.get('servingPlanHash')} ready={st.get('ready')} replan={replan} [{conds}]"
    )


class EndpointWatch:
    """Polls the user-facing Service's EndpointSlices every `interval` seconds in a thread
    and records (time, ready endpoints) for each poll."""

    def __init__(self, lab: Lab, service: str, *, interval: float = 0.1) -> None:
        self.lab, self.service, self.interval = lab, service, interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        # a client of its own: lightkube's sync client is not shared across threads
        self._client = lab.plane.client(field_manager="endpoint-watch")

    def _run(self) -> None:
        while not self._stop.is_set():
            slices = self._client.list(
                EndpointSlice,
                namespace=self.lab.namespace,
                labels={"kubernetes.io/service-name": self.service},
            )
            ready = sum(
                1
                for s in slices
                for ep in s.endpoints or []
                if ep.conditions is not None and ep.conditions.ready
            )
            self.samples.append((time.monotonic(), ready))
            self._stop.wait(self.interval)

    @contextlib.contextmanager
    def running(self) -> Iterator[EndpointWatch]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(timeout=10)

    def gaps(self) -> list[float]:
        """Times (relative to the first sample) at which no endpoint was ready."""
        start = self.samples[0][0] if self.samples else 0.0
        return [round(t - start, 2) for t, ready in self.samples if ready == 0]


def _service_account_kubeconfig(
    plane: cp.ControlPlane, namespace: str, account: str, path: Path
) -> Path:
    """A kubeconfig acting as the ServiceAccount, with a TokenRequest-bound token."""
    from lightkube.models.authentication_v1 import TokenRequestSpec
    from lightkube.models.meta_v1 import ObjectMeta
    from lightkube.resources.core_v1 import ServiceAccountToken

    request = ServiceAccountToken(
        metadata=ObjectMeta(name=account, namespace=namespace),
        spec=TokenRequestSpec(audiences=[cp.SERVICE_ACCOUNT_ISSUER], expirationSeconds=3600),
    )
    issued = plane.client().create(request, account, namespace=namespace)
    assert issued.status is not None and issued.status.token, "TokenRequest returned no token"
    ca = (plane.workdir / "pki" / "ca.crt").read_bytes()
    document = cp.kubeconfig_document(
        plane.server, ca, issued.status.token, user=f"{namespace}-{account}"
    )
    path.write_text(yaml.safe_dump(document))
    return path
