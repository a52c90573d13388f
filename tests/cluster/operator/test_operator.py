"""The operator against a real control plane (etcd, kube-apiserver, controller-manager,
scheduler; kwok nodes), running as a real process under the chart's RBAC.

Covers: an applied pipeline is planned, its stage pods are bound by the real scheduler to
exactly the planned nodes and Running, and the status is Ready with the plan; the plan
ConfigMap wires the stages; changing maxStages / the objective re-plans and converges,
with the user-facing Service keeping a ready endpoint throughout (EndpointSlices polled
every 100 ms) and the old plan's objects removed; a bad spec is refused at apply (OpenAPI
and CEL); an infeasible spec gets Planned=False/InsufficientMemory and nothing deployed;
deleting the pipeline removes its children; `kubectl get llmp` shows the printer columns.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightkube import ApiError, Client
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import ConfigMap, Event, Node, Pod, Service
from lightkube.resources.discovery_v1 import EndpointSlice
from lightkube.types import PatchType

from tests.cluster.operator.conftest import (
    OperatorProcess,
    Pool,
    pipeline_manifest,
    start_operator,
    stop_operator,
)
from tests.support import control_plane as cp
from tests.support import wait

LLMPipeline = create_namespaced_resource("llmpipe.io", "v1alpha1", "LLMPipeline", "llmpipelines")
PIPELINE_LABEL = "llmpipe.io/pipeline"


def apply(
    control_plane: cp.ControlPlane, namespace: str, manifest: dict[str, Any]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(control_plane.bin_dir / "kubectl"), "apply", "-n", namespace, "-f", "-"],
        input=yaml.safe_dump(manifest),
        env=control_plane.env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def status_of(client: Client, namespace: str, name: str) -> dict[str, Any]:
    return dict(client.get(LLMPipeline, name, namespace=namespace).to_dict().get("status") or {})


def condition(st: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in st.get("conditions") or [] if c["type"] == kind), {})


def wait_ready(
    client: Client,
    operator: OperatorProcess,
    namespace: str,
    name: str,
    *,
    generation: int | None = None,
    timeout: float = 90,
) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        obj = client.get(LLMPipeline, name, namespace=namespace).to_dict()
        st = obj.get("status") or {}
        wanted = generation or obj["metadata"]["generation"]
        if (
            st.get("phase") == "Ready"
            and st.get("observedGeneration") == wanted
            and st.get("servingPlanHash") == st.get("planHash")
        ):
            return st
        return None

    return wait.until(
        ready,
        what=f"{name} Ready",
        timeout=timeout,
        interval=0.3,
        seen=lambda: f"{status_of(client, namespace, name)}\noperator log:\n{operator.log_tail()}",
    )


def wait_phase(
    client: Client, operator: OperatorProcess, namespace: str, name: str, phase: str
) -> dict[str, Any]:
    """The pipeline's status once its phase is `phase` (60 s at most)."""

    def reached() -> dict[str, Any] | None:
        st = status_of(client, namespace, name)
        return st if st.get("phase") == phase else None

    return wait.until(
        reached,
        what=f"{name} phase {phase}",
        timeout=60,
        seen=lambda: f"{status_of(client, namespace, name)}\n{operator.log_tail()}",
    )


def wait_planned_false(
    client: Client,
    operator: OperatorProcess,
    namespace: str,
    name: str,
    *,
    reason: str | None = None,
    timeout: float = 60,
) -> dict[str, Any]:
    """The pipeline's status once Planned is False (with `reason`, when one is given)."""

    def refused() -> dict[str, Any] | None:
        st = status_of(client, namespace, name)
        planned = condition(st, "Planned")
        if planned.get("status") != "False" or reason not in (None, planned.get("reason")):
            return None
        return st

    return wait.until(
        refused,
        what=f"{name} Planned=False" + (f"/{reason}" if reason else ""),
        timeout=timeout,
        interval=0.2,
        seen=lambda: f"{status_of(client, namespace, name)}\n{operator.log_tail()}",
    )


def stage_pods(client: Client, namespace: str, name: str, digest: str) -> list[Pod]:
    return list(
        client.list(
            Pod, namespace=namespace, labels={PIPELINE_LABEL: name, "llmpipe.io/plan-hash": digest}
        )
    )


def assert_pods_on_planned_nodes(
    client: Client, namespace: str, name: str, st: dict[str, Any]
) -> None:
    pods = stage_pods(client, namespace, name, st["planHash"])
    by_index = {int(p.metadata.labels["llmpipe.io/stage-index"]): p for p in pods}
    planned = {s["index"]: s["node"] for s in st["plan"]["stages"]}
    assert sorted(by_index) == sorted(planned), (by_index.keys(), planned)
    for index, node in planned.items():
        pod = by_index[index]
        assert pod.spec.nodeName == node, f"stage {index} on {pod.spec.nodeName}, planned {node}"
        assert pod.status.phase == "Running"


def objects_of(client: Client, namespace: str, name: str) -> dict[str, set[str]]:
    found = {}
    for kind in (Deployment, Service, ConfigMap):
        found[kind.__name__] = {
            o.metadata.name
            for o in client.list(kind, namespace=namespace, labels={PIPELINE_LABEL: name})
        }
    return found


class EndpointWatch:
    """Polls the user-facing Service's EndpointSlices every 100 ms; records when each poll
    happened and the empty moments. It gets a client of its own: lightkube's sync client
    is not shared across threads."""

    def __init__(self, client: Client, namespace: str, service: str) -> None:
        self.client, self.namespace, self.service = client, namespace, service
        self.times: list[float] = []
        self.gaps: list[float] = []
        self.snapshots: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def ready_endpoints(self) -> list[str]:
        slices = self.client.list(
            EndpointSlice,
            namespace=self.namespace,
            labels={"kubernetes.io/service-name": self.service},
        )
        return [
            ep.targetRef.name
            for s in slices
            for ep in (s.endpoints or [])
            if ep.conditions and ep.conditions.ready and ep.targetRef
        ]

    def describe(self) -> str:
        """Every endpoint of every slice, ready or not (for the failure message)."""
        slices = self.client.list(
            EndpointSlice,
            namespace=self.namespace,
            labels={"kubernetes.io/service-name": self.service},
        )
        return (
            "; ".join(
                f"{s.metadata.name}: "
                + ", ".join(
                    f"{ep.targetRef.name if ep.targetRef else '?'} ready={ep.conditions.ready}"
                    for ep in (s.endpoints or [])
                )
                for s in slices
            )
            or "no slices"
        )

    def run(self) -> None:
        while not self.stop.is_set():
            if not self.ready_endpoints():
                self.gaps.append(time.monotonic())
                self.snapshots.append(self.describe())
            self.times.append(time.monotonic())
            self.stop.wait(0.1)

    def longest_step(self) -> float:
        """The longest stretch between two polls: nothing in it went unobserved if short."""
        return max(later - earlier for earlier, later in itertools.pairwise(self.times))

    def __enter__(self) -> EndpointWatch:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


@pytest.fixture
def client(control_plane: cp.ControlPlane) -> Client:
    return control_plane.client()


def test_pipeline_is_planned_deployed_on_planned_nodes_and_replans(
    control_plane: cp.ControlPlane,
    operator: OperatorProcess,
    namespace: str,
    pool: Pool,
    client: Client,
) -> None:
    pool.add("edge-a", tier="edge", memory="300Mi", tflops=1.0, uplink_mbps=300)
    pool.add("edge-b", tier="edge", memory="300Mi", tflops=1.5, uplink_mbps=300)
    # 2Gi: room for two single-stage plans side by side, as the switch of step 3 needs (the
    # new plan's stage comes up next to the serving one, and both request their memory)
    cloud = pool.add("cloud-a", tier="cloud", memory="2Gi", tflops=20.0, uplink_mbps=1000)
    manifest = pipeline_manifest(
        "chat", selector=pool.selector, placement={"firstStage": "edge", "maxStages": 3}
    )
    started = time.monotonic()
    result = apply(control_plane, namespace, manifest)
    assert result.returncode == 0, result.stderr

    # 1. planned, deployed where planned, Ready
    st = wait_ready(client, operator, namespace, "chat")
    print(f"\napply -> Ready with all stage pods Running: {time.monotonic() - started:.1f}s")
    assert st["stageCount"] >= 2
    assert st["plan"]["stages"][0]["node"].startswith(f"{pool.label}-edge")
    assert condition(st, "Planned")["status"] == "True"
    assert condition(st, "Ready")["status"] == "True"
    assert st["ready"] == f"{st['stageCount']}/{st['stageCount']}"
    assert st["endpoint"] == f"http://chat.{namespace}.svc:8000/v1"
    assert_pods_on_planned_nodes(client, namespace, "chat", st)
    first = st["planHash"]
    print("\n$ kubectl get llmp\n" + control_plane.kubectl("get", "llmp", "-n", namespace).stdout)
    print(
        "$ kubectl get pods -o wide\n"
        + control_plane.kubectl(
            "get",
            "pods",
            "-n",
            namespace,
            "-o",
            "custom-columns=NAME:.metadata.name,STATUS:.status.phase,NODE:.spec.nodeName",
        ).stdout
    )

    # the plan ConfigMap wires the stages to each other's Services
    cm = client.get(ConfigMap, f"chat-{first}-plan", namespace=namespace)
    plan = json.loads(cm.data["plan.json"])
    assert [(s["index"], s["node"]) for s in plan["stages"]] == [
        (s["index"], s["node"]) for s in st["plan"]["stages"]
    ]
    wiring = json.loads(cm.data["pipeline.json"])
    for entry in wiring["stages"]:
        service = entry["address"].split(".")[0]
        assert client.get(Service, service, namespace=namespace).spec.ports[0].port == 50051
    endpoint = client.get(Service, "chat", namespace=namespace)
    assert endpoint.spec.selector["llmpipe.io/plan-hash"] == first
    events = [
        e
        for e in client.list(Event, namespace=namespace)
        if e.involvedObject.name == "chat" and e.reason == "Planned"
    ]
    assert events and plan["stages"][0]["node"] in events[0].message

    # 2. maxStages 1 (anywhere): re-plans onto the cloud node; the endpoint never empties
    watcher = control_plane.client(field_manager="endpoint-watch")
    with EndpointWatch(watcher, namespace, "chat") as watch:
        time.sleep(0.5)  # a few polls before the switch begins
        patched_at = time.monotonic()
        client.patch(
            LLMPipeline,
            "chat",
            {
                "spec": {
                    "placement": {"maxStages": 1, "firstStage": "any"},
                    "replan": {"drainSeconds": 0},  # tests/cluster/replan covers the drain
                }
            },
            namespace=namespace,
            patch_type=PatchType.MERGE,
        )
        st = wait_ready(client, operator, namespace, "chat", generation=2)
        wait.until(
            lambda: (
                objects_of(client, namespace, "chat")["Deployment"] == {f"chat-{st['planHash']}-s0"}
            ),
            what="the old plan's Deployments removed",
            timeout=30,
            seen=lambda: str(objects_of(client, namespace, "chat")),
        )
        done_at = time.monotonic()
        time.sleep(0.5)  # a few polls after the old stage 0 went away
    assert st["planHash"] != first
    assert st["stageCount"] == 1 and st["plan"]["stages"][0]["node"] == cloud
    assert_pods_on_planned_nodes(client, namespace, "chat", st)
    # The polls cover the whole switch, with no stretch unobserved, and none found it empty.
    assert watch.times[0] < patched_at and watch.times[-1] > done_at
    assert watch.longest_step() < 1.0, f"polls {watch.longest_step():.2f} s apart"
    assert watch.gaps == [], (
        f"endpoint empty at {len(watch.gaps)} polls: {watch.snapshots}\n{operator.log_tail(80)}"
    )
    remaining = objects_of(client, namespace, "chat")
    assert not any(first in n for names in remaining.values() for n in names), remaining

    # 3. the objective changes: a new plan (latency estimates) converges
    second = st["planHash"]
    client.patch(
        LLMPipeline,
        "chat",
        {"spec": {"workload": {"objective": "latency"}}},
        namespace=namespace,
        patch_type=PatchType.MERGE,
    )
    st = wait_ready(client, operator, namespace, "chat", generation=3)
    assert st["planHash"] != second
    assert st["estimates"]["objective"] == "latency"
    assert_pods_on_planned_nodes(client, namespace, "chat", st)

    # 4. kubectl get llmp shows the printer columns
    table = control_plane.kubectl("get", "llmp", "-n", namespace).stdout
    print("\n$ kubectl get llmp\n" + table)
    header = table.splitlines()[0].split()
    assert header[:3] == ["NAME", "PHASE", "STAGES"] and "BOTTLENECK" in header
    assert "Ready" in table.splitlines()[1]

    # 5. deleting the pipeline removes every child (owner references, no finalizer)
    client.delete(LLMPipeline, "chat", namespace=namespace)
    wait.until(
        lambda: (
            objects_of(client, namespace, "chat")
            == {"Deployment": set(), "Service": set(), "ConfigMap": set()}
        ),
        what="children garbage-collected",
        timeout=60,
        seen=lambda: str(objects_of(client, namespace, "chat")),
    )


def test_infeasible_pipeline_is_not_planned_and_deploys_nothing(
    control_plane: cp.ControlPlane,
    operator: OperatorProcess,
    namespace: str,
    pool: Pool,
    client: Client,
) -> None:
    pool.add("edge-a", tier="edge", memory="300Mi")
    pool.add("edge-b", tier="edge", memory="300Mi")
    result = apply(control_plane, namespace, pipeline_manifest("big", selector=pool.selector))
    assert result.returncode == 0, result.stderr

    st = wait_planned_false(client, operator, namespace, "big")
    planned = condition(st, "Planned")
    assert planned["reason"] == "InsufficientMemory"
    assert "short" in planned["message"] or "need" in planned["message"], planned["message"]
    assert st["phase"] == "Failed"
    assert objects_of(client, namespace, "big") == {
        "Deployment": set(),
        "Service": set(),
        "ConfigMap": set(),
    }
    warnings = [
        e
        for e in client.list(Event, namespace=namespace)
        if e.involvedObject.name == "big" and e.type == "Warning"
    ]
    assert any(e.reason == "InsufficientMemory" for e in warnings)


bad_specs = pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda m: m["spec"]["placement"].update(maxStages=0),
            "spec.placement.maxStages: Invalid value: 0",
        ),
        (
            lambda m: m["spec"]["workload"].update(maxContextTokens=0),
            "spec.workload.maxContextTokens",
        ),
        (
            lambda m: m["spec"]["model"]["source"].update(pvc={"claimName": "m"}),
            "model.source must set exactly one of pvc, hostPath, huggingFace or gguf",
        ),
        (
            lambda m: m["spec"]["model"]["source"].update(
                hostPath=None, pvc={"claimName": "m", "path": "../x"}
            ),
            "must be relative to the volume root",
        ),
        (
            lambda m: m["spec"]["workload"].update(objective="fastest"),
            'Unsupported value: "fastest"',
        ),
        (
            lambda m: m["metadata"].update(name="9-starts-with-a-digit"),
            "metadata.name must be a DNS-1035 label",
        ),
        (
            lambda m: m["spec"]["model"].update(
                source={
                    "gguf": {"hostPath": "/m/a.gguf", "pvc": {"claimName": "c", "path": "a.gguf"}}
                }
            ),
            "model.source.gguf must set exactly one of hostPath, pvc or huggingFace",
        ),
        (
            lambda m: m["spec"]["model"].update(source={"gguf": {"hostPath": "/m/model.bin"}}),
            "spec.model.source.gguf.hostPath in body should match",
        ),
        (
            lambda m: m["spec"].update(service={"auth": {"apiKeySecret": "Not_A_Name"}}),
            "spec.service.auth.apiKeySecret in body should match",
        ),
        (
            lambda m: m["spec"].update(service={"maxPromptCharacters": 0}),
            "spec.service.maxPromptCharacters in body should be greater than or equal to 1",
        ),
        (
            lambda m: m["spec"]["workload"].update(prefillTokensInFlight=-1),
            "spec.workload.prefillTokensInFlight in body should be greater than or equal to 0",
        ),
    ],
    ids=[
        "maxStages-0",
        "context-0",
        "two-sources",
        "dotdot",
        "objective",
        "name",
        "gguf-two-locations",
        "gguf-not-gguf",
        "api-key-secret-name",
        "prompt-bound-0",
        "in-flight-negative",
    ],
)


@bad_specs
def test_bad_spec_is_refused_at_apply(
    control_plane: cp.ControlPlane, crd: object, namespace: str, mutate, message: str
) -> None:
    manifest = pipeline_manifest("bad", selector={"pool": "none"}, workload={})
    mutate(manifest)
    manifest["spec"]["model"]["source"] = {
        k: v for k, v in manifest["spec"]["model"]["source"].items() if v is not None
    }
    result = apply(control_plane, namespace, manifest)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    with pytest.raises(ApiError):
        control_plane.client().get(LLMPipeline, manifest["metadata"]["name"], namespace=namespace)


def test_api_keys_and_the_prompt_bound_are_stored_with_their_defaults(
    control_plane: cp.ControlPlane, crd: object, namespace: str
) -> None:
    manifest = pipeline_manifest("keys", selector={"pool": "none"}, workload={})
    manifest["spec"]["service"] = {"auth": {"apiKeySecret": "keys-api"}}
    result = apply(control_plane, namespace, manifest)
    assert result.returncode == 0, result.stderr
    stored = control_plane.client().get(LLMPipeline, "keys", namespace=namespace)
    assert stored.spec["service"]["auth"] == {"apiKeySecret": "keys-api", "protectMetrics": False}
    assert stored.spec["service"]["maxPromptCharacters"] == 1_000_000


def test_gguf_source_is_accepted_with_its_defaults(
    control_plane: cp.ControlPlane, crd: object, namespace: str
) -> None:
    manifest = pipeline_manifest("gguf", selector={"pool": "none"}, workload={})
    hub = {"id": "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF", "filename": "smol.Q4_1.gguf"}
    manifest["spec"]["model"]["source"] = {"gguf": {"huggingFace": hub}}
    result = apply(control_plane, namespace, manifest)
    assert result.returncode == 0, result.stderr
    stored = control_plane.client().get(LLMPipeline, "gguf", namespace=namespace)
    assert stored.spec["model"]["source"]["gguf"]["huggingFace"] == {**hub, "revision": "main"}


def test_tainted_node_is_used_only_when_tolerated(
    control_plane: cp.ControlPlane,
    operator: OperatorProcess,
    namespace: str,
    pool: Pool,
    client: Client,
) -> None:
    node = pool.add("gpu", tier="cloud", memory="2Gi")
    client.patch(
        Node,
        node,
        {
            "spec": {
                "taints": [{"key": "llmpipe.io/dedicated", "value": "llm", "effect": "NoSchedule"}]
            }
        },
        patch_type=PatchType.MERGE,
    )
    result = apply(control_plane, namespace, pipeline_manifest("tainted", selector=pool.selector))
    assert result.returncode == 0, result.stderr

    st = wait_phase(client, operator, namespace, "tainted", "Pending")
    planned = condition(st, "Planned")
    assert (planned["status"], planned["reason"]) == ("False", "NoEligibleNodes")
    assert "taint llmpipe.io/dedicated=llm:NoSchedule not tolerated" in planned["message"]

    client.patch(
        LLMPipeline,
        "tainted",
        {
            "spec": {
                "placement": {
                    "tolerations": [
                        {
                            "key": "llmpipe.io/dedicated",
                            "operator": "Equal",
                            "value": "llm",
                            "effect": "NoSchedule",
                        }
                    ]
                }
            }
        },
        namespace=namespace,
        patch_type=PatchType.MERGE,
    )
    st = wait_ready(client, operator, namespace, "tainted", generation=2)
    assert [s["node"] for s in st["plan"]["stages"]] == [node]
    assert_pods_on_planned_nodes(client, namespace, "tainted", st)


def test_operator_runs_with_least_privilege(
    control_plane: cp.ControlPlane, operator: OperatorProcess, namespace: str, crd: object
) -> None:
    """What the chart's RBAC lets the operator's ServiceAccount do, asked of the API server."""
    user = f"system:serviceaccount:{operator.release_namespace}:{operator.account}"

    def can(*args: str) -> bool:
        result = control_plane.kubectl("auth", "can-i", *args, "--as", user, check=False)
        return result.stdout.strip() == "yes"

    assert can("list", "nodes")
    assert can("watch", "nodes")
    assert can("patch", "llmpipelines.llmpipe.io/status", "-n", namespace)
    assert can("create", "deployments.apps", "-n", namespace)
    assert can("delete", "services", "-n", namespace)
    assert can("watch", "endpointslices.discovery.k8s.io", "-n", namespace)
    assert not can("patch", "nodes")
    # Secrets: by name only, for the pipelines' CA and stage certificates (no listing).
    assert can("get", "secrets", "-n", namespace)
    assert can("create", "secrets", "-n", namespace)
    assert not can("list", "secrets", "-n", namespace)
    assert not can("watch", "secrets", "-n", namespace)
    assert not can("delete", "secrets", "-n", namespace)
    assert not can("get", "secrets", "-n", "default")
    assert can("create", "networkpolicies.networking.k8s.io", "-n", namespace)
    assert not can("create", "deployments.apps", "-n", "default")
    assert not can("create", "deployments.apps", "-n", "kube-system")
    assert not can("patch", "deployments.apps", "-n", operator.release_namespace)
    assert not can("create", "deployments.apps", "-n", operator.release_namespace)
    assert not can("create", "llmpipelines.llmpipe.io", "-n", namespace)
    assert not can("list", "customresourcedefinitions.apiextensions.k8s.io")
    assert not can("create", "pods", "-n", namespace)


def test_infeasible_change_keeps_the_running_plan_serving(
    control_plane: cp.ControlPlane,
    operator: OperatorProcess,
    namespace: str,
    pool: Pool,
    client: Client,
) -> None:
    pool.add("cloud-a", tier="cloud", memory="1Gi")
    result = apply(control_plane, namespace, pipeline_manifest("keep", selector=pool.selector))
    assert result.returncode == 0, result.stderr
    st = wait_ready(client, operator, namespace, "keep")
    serving, pods = st["planHash"], stage_pods(client, namespace, "keep", st["planHash"])

    # 64k tokens of KV cache for 4 sequences need ~4 GiB: no plan fits any more
    client.patch(
        LLMPipeline,
        "keep",
        {"spec": {"workload": {"maxContextTokens": 65536}}},
        namespace=namespace,
        patch_type=PatchType.MERGE,
    )

    st = wait_phase(client, operator, namespace, "keep", "Degraded")
    assert condition(st, "Planned")["reason"] == "InsufficientMemory"
    assert condition(st, "Degraded")["message"].startswith("serving the previous plan")
    assert st["planHash"] == serving
    endpoint = client.get(Service, "keep", namespace=namespace)
    assert endpoint.spec.selector["llmpipe.io/plan-hash"] == serving
    still = stage_pods(client, namespace, "keep", serving)
    assert {p.metadata.uid for p in still} == {p.metadata.uid for p in pods}


def two_node_pipeline_ready(
    control_plane: cp.ControlPlane,
    operator: OperatorProcess,
    namespace: str,
    pool: Pool,
    client: Client,
    name: str,
) -> dict[str, Any]:
    """An edge node and a cloud node, a privacy-first pipeline over them, waited to Ready."""
    pool.add("edge-a", tier="edge", memory="300Mi")
    pool.add("cloud-a", tier="cloud", memory="1Gi")
    result = apply(
        control_plane,
        namespace,
        pipeline_manifest(name, selector=pool.selector, placement={"firstStage": "edge"}),
    )
    assert result.returncode == 0, result.stderr
    return wait_ready(client, operator, namespace, name)


def test_operator_restart_resumes_without_touching_a_ready_pipeline(
    control_plane: cp.ControlPlane,
    operator: OperatorProcess,
    namespace: str,
    pool: Pool,
    client: Client,
    tmp_path: Path,
) -> None:
    st = two_node_pipeline_ready(control_plane, operator, namespace, pool, client, "steady")
    pods = {p.metadata.uid for p in stage_pods(client, namespace, "steady", st["planHash"])}

    stop_operator(control_plane, operator)
    restarted = start_operator(control_plane, namespace=namespace, workdir=tmp_path / "again")
    try:
        wait.until(
            lambda: "reconcile_spec" in restarted.log.read_text(),
            what="the resume handler",
            timeout=60,
            seen=restarted.log_tail,
        )
        after = wait_ready(client, restarted, namespace, "steady")
    finally:
        stop_operator(control_plane, restarted)
    assert after["planHash"] == st["planHash"]
    assert {
        p.metadata.uid for p in stage_pods(client, namespace, "steady", after["planHash"])
    } == pods


def test_deletion_never_waits_on_the_operator(
    control_plane: cp.ControlPlane,
    operator: OperatorProcess,
    namespace: str,
    pool: Pool,
    client: Client,
) -> None:
    two_node_pipeline_ready(control_plane, operator, namespace, pool, client, "orphan")
    body = client.get(LLMPipeline, "orphan", namespace=namespace)
    assert not body.metadata.finalizers, body.metadata.finalizers

    # With the operator gone (uninstalled, crashed), deleting still completes: nothing but
    # the garbage collector is involved.
    stop_operator(control_plane, operator)
    client.delete(LLMPipeline, "orphan", namespace=namespace)
    wait.until(
        lambda: (
            objects_of(client, namespace, "orphan")
            == {"Deployment": set(), "Service": set(), "ConfigMap": set()}
            and not [p for p in client.list(LLMPipeline, namespace=namespace)]
        ),
        what="the pipeline deleted and its children garbage-collected without an operator",
        timeout=60,
        seen=lambda: str(objects_of(client, namespace, "orphan")),
    )
