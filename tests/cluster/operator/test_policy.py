"""Tenant safety on a real control plane: the admin's policy, enforced twice, and the
pipeline's NetworkPolicy.

Covers: the test API server serves admissionregistration.k8s.io/v1 ValidatingAdmissionPolicy
and enforces it (the plugin is on by default in Kubernetes 1.35); a pipeline author bound only
to `llmpipelines` verbs (a ServiceAccount with a Role, acted as through impersonation; it may
not create pods nor read Secrets) tries the three attacks -- a foreign image, an env
`valueFrom.secretKeyRef` of another app's Secret, a hostPath of /etc -- and each is refused at
`kubectl apply` by the chart's ValidatingAdmissionPolicy (rendered by the real helm) with the
rule's message; the allowed spec still runs (Ready, the default profile's image); with the
admission binding gone (admission bypassed), the operator, holding the chart's default policy,
refuses the same attacks: Planned=False reason PolicyViolation naming the rules, a Warning
Event, no Deployment, and a running pipeline switched to a violating spec loses its
Deployments; an operator with the chart's cluster-wide opt-in deploys a pipeline where a
RoleBinding grants it and nothing in a namespace without one; the NetworkPolicy of a
pipeline exists with the selectors of its stage pods
(the test control plane has no CNI, so nothing enforces it here: docs/security.md).
"""

from __future__ import annotations

import copy
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightkube import Client
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import Event, Secret
from lightkube.resources.networking_v1 import NetworkPolicy

from tests.cluster.operator.conftest import (
    MODEL_CONFIG,
    OperatorProcess,
    Pool,
    pipeline_manifest,
    render_rbac,
    start_operator,
    stop_operator,
)
from tests.cluster.operator.test_operator import (
    PIPELINE_LABEL,
    condition,
    status_of,
    wait_phase,
    wait_ready,
)
from tests.support import control_plane as cp
from tests.support import wait

AUTHOR = "pipeline-author"


def allowed_pipeline(name: str, selector: dict[str, str]) -> dict[str, Any]:
    """A pipeline the chart's default policy allows: no image (the default profile's), a
    hostPath under /var/lib/llmpipe/models, literal env."""
    return {
        "apiVersion": "llmpipe.io/v1alpha1",
        "kind": "LLMPipeline",
        "metadata": {"name": name},
        "spec": {
            "model": {
                "name": "tiny-llama-16",
                "source": {"hostPath": {"path": "/var/lib/llmpipe/models/tiny"}},
                "config": dict(MODEL_CONFIG),
            },
            "placement": {"nodeSelector": selector, "maxStages": 2},
            "runtime": {
                "runtimeOverhead": "64Mi",
                "env": [{"name": "OMP_NUM_THREADS", "value": "2"}],
            },
        },
    }


def foreign_image(spec: dict[str, Any]) -> None:
    spec["runtime"]["image"] = "evil.example/exfil:latest"


def secret_env(spec: dict[str, Any]) -> None:
    spec["runtime"]["env"] = [
        {"name": "STOLEN", "valueFrom": {"secretKeyRef": {"name": "other-app", "key": "password"}}}
    ]


def host_etc(spec: dict[str, Any]) -> None:
    spec["model"]["source"] = {"hostPath": {"path": "/etc"}}


def gguf_host_etc(spec: dict[str, Any]) -> None:
    spec["model"]["source"] = {"gguf": {"hostPath": "/etc/llmpipe/../shadow.gguf"}}


def draft_host_etc(spec: dict[str, Any]) -> None:
    """The draft model's host path (spec.model.draft) is held to the same rule."""
    config = {**MODEL_CONFIG, "num_hidden_layers": 1}
    spec["model"]["draft"] = {"source": {"hostPath": {"path": "/etc"}}, "config": config}
    spec.setdefault("workload", {})["speculation"] = "draft"


ATTACKS = {
    "foreign-image": (
        foreign_image,
        "[allowedImages] spec.runtime.image evil.example/exfil:latest matches no allowed image",
    ),
    "secret-env": (secret_env, "[literalEnv] spec.runtime.env: valueFrom is not allowed"),
    "host-etc": (
        host_etc,
        "[hostPathPrefixes] spec.model.source.hostPath.path /etc is not under an allowed host",
    ),
    "gguf-host-path": (
        gguf_host_etc,
        "[hostPathPrefixes] spec.model.source.gguf.hostPath /etc/llmpipe/../shadow.gguf is not",
    ),
    "draft-host-path": (
        draft_host_etc,
        "[hostPathPrefixes] spec.model.draft.source.hostPath.path /etc is not under an allowed",
    ),
}
attacks = pytest.mark.parametrize("attack", list(ATTACKS))


def attacked(name: str, selector: dict[str, str], attack: str) -> dict[str, Any]:
    manifest = allowed_pipeline(name, selector)
    ATTACKS[attack][0](manifest["spec"])
    return manifest


def kubectl(
    plane: cp.ControlPlane, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(plane.bin_dir / "kubectl"), *args],
        input=stdin,
        env=plane.env,
        capture_output=True,
        text=True,
        timeout=60,
    )


class Author:
    """A ServiceAccount bound only to `llmpipelines` verbs in its namespace, acted as through
    impersonation (the admission policy sees this user, not the admin)."""

    def __init__(self, plane: cp.ControlPlane, namespace: str) -> None:
        self.plane, self.namespace = plane, namespace
        self.user = f"system:serviceaccount:{namespace}:{AUTHOR}"

    def create(self) -> None:
        role = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": AUTHOR, "namespace": self.namespace},
            "rules": [
                {
                    "apiGroups": ["llmpipe.io"],
                    "resources": ["llmpipelines"],
                    "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"],
                }
            ],
        }
        binding = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": AUTHOR, "namespace": self.namespace},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": AUTHOR},
            "subjects": [{"kind": "ServiceAccount", "name": AUTHOR, "namespace": self.namespace}],
        }
        self.plane.ensure_service_account(self.namespace, AUTHOR)
        done = kubectl(self.plane, "apply", "-f", "-", stdin=yaml.safe_dump_all([role, binding]))
        assert done.returncode == 0, done.stderr

    def can(self, verb: str, resource: str) -> bool:
        done = kubectl(
            self.plane, "auth", "can-i", verb, resource, "-n", self.namespace, "--as", self.user
        )
        return done.stdout.strip() == "yes"

    def apply(
        self, manifest: dict[str, Any], *, dry_run: bool = False
    ) -> subprocess.CompletedProcess[str]:
        extra = ["--dry-run=server"] if dry_run else []
        return kubectl(
            self.plane,
            "apply",
            *extra,
            "-n",
            self.namespace,
            "--as",
            self.user,
            "-f",
            "-",
            stdin=yaml.safe_dump(manifest),
        )

    def await_policy(self, selector: dict[str, str], *, effective: bool) -> None:
        """Until the API server has loaded (or dropped) the admission policy: server-side
        dry runs of a violating create, which store nothing."""
        probe = attacked("probe", selector, "host-etc")
        wait.until(
            lambda: (self.apply(probe, dry_run=True).returncode != 0) is effective,
            what=f"the admission policy {'in effect' if effective else 'gone'}",
            timeout=30,
            interval=0.5,
        )


class AdmissionPolicy:
    """The chart's ValidatingAdmissionPolicy + binding (helm template, default values,
    bound to the test's namespace), applied and removed by the admin."""

    def __init__(self, plane: cp.ControlPlane, namespace: str, workdir: Path) -> None:
        self.plane = plane
        docs = render_rbac(
            plane,
            release=f"llmpipe-{uuid.uuid4().hex[:6]}",
            namespace="llmpipe-system",
            watch=[namespace],
            templates=("policy.yaml",),
        )
        self.objects = [d for d in docs if d["kind"] != "ConfigMap"]
        assert {d["kind"] for d in self.objects} == {
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
        }
        self.path = workdir / "admission.yaml"
        self.path.write_text(yaml.safe_dump_all(self.objects))

    @property
    def binding(self) -> str:
        (found,) = [
            f"validatingadmissionpolicybinding/{d['metadata']['name']}"
            for d in self.objects
            if d["kind"] == "ValidatingAdmissionPolicyBinding"
        ]
        return found

    def install(self) -> None:
        done = kubectl(self.plane, "apply", "-f", str(self.path))
        assert done.returncode == 0, done.stderr

    def remove_binding(self) -> None:
        done = kubectl(self.plane, "delete", self.binding, "--wait=true")
        assert done.returncode == 0, done.stderr

    def uninstall(self) -> None:
        kubectl(self.plane, "delete", "--ignore-not-found", "-f", str(self.path))


@pytest.fixture
def client(control_plane: cp.ControlPlane) -> Client:
    return control_plane.client()


@pytest.fixture
def default_policy_operator(
    control_plane: cp.ControlPlane, crd: object, namespace: str, tmp_path: Path
) -> Iterator[OperatorProcess]:
    """The operator with the chart's default policy (no test image allowed: the allowed
    pipeline runs the default profile's image, which kwok never pulls)."""
    (config,) = render_rbac(
        control_plane,
        release="llmpipe",
        namespace="llmpipe-system",
        watch=[namespace],
        templates=("policy.yaml",),
        values=("policy.admission.enabled=false",),
    )
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(config["data"]["policy.json"])
    handle = start_operator(
        control_plane, namespace=namespace, workdir=tmp_path / "operator", policy_file=policy_file
    )
    try:
        yield handle
    finally:
        stop_operator(control_plane, handle)


@pytest.fixture
def admission(
    control_plane: cp.ControlPlane, crd: object, namespace: str, tmp_path: Path
) -> Iterator[AdmissionPolicy]:
    policy = AdmissionPolicy(control_plane, namespace, tmp_path)
    policy.install()
    try:
        yield policy
    finally:
        policy.uninstall()


@pytest.fixture
def author(control_plane: cp.ControlPlane, crd: object, namespace: str) -> Author:
    made = Author(control_plane, namespace)
    made.create()
    # Another app's Secret in the same namespace: what the secretKeyRef attack is after.
    control_plane.client().create(
        Secret.from_dict(
            {"metadata": {"name": "other-app"}, "stringData": {"password": "hunter2"}}
        ),
        namespace=namespace,
    )
    return made


def test_the_api_server_serves_validating_admission_policies(
    control_plane: cp.ControlPlane,
) -> None:
    done = kubectl(control_plane, "api-resources", "--api-group=admissionregistration.k8s.io")
    assert done.returncode == 0, done.stderr
    assert "validatingadmissionpolicies" in done.stdout
    assert "validatingadmissionpolicybindings" in done.stdout


def test_the_author_may_only_manage_pipelines(author: Author) -> None:
    assert author.can("create", "llmpipelines.llmpipe.io")
    assert not author.can("create", "pods")
    assert not author.can("create", "deployments.apps")
    assert not author.can("get", "secrets")


@attacks
def test_each_attack_is_refused_at_apply_with_the_rules_message(
    author: Author, admission: AdmissionPolicy, pool: Pool, attack: str
) -> None:
    # The policy takes effect once the API server has loaded it (a second or so).
    author.await_policy(pool.selector, effective=True)
    done = author.apply(attacked(f"attack-{attack}", pool.selector, attack))
    assert done.returncode != 0, done.stdout
    assert "ValidatingAdmissionPolicy" in done.stderr and "denied request" in done.stderr
    assert ATTACKS[attack][1] in done.stderr, done.stderr


def test_the_allowed_spec_is_admitted_and_runs(
    control_plane: cp.ControlPlane,
    client: Client,
    default_policy_operator: OperatorProcess,
    author: Author,
    admission: AdmissionPolicy,
    pool: Pool,
    namespace: str,
) -> None:
    for node in ("a", "b"):
        pool.add(node, tier="cloud", memory="2Gi")
    author.await_policy(pool.selector, effective=True)  # judged by the policy, not before it
    done = author.apply(allowed_pipeline("allowed", pool.selector))
    assert done.returncode == 0, done.stderr
    st = wait_ready(client, default_policy_operator, namespace, "allowed")
    deployments = list(
        client.list(Deployment, namespace=namespace, labels={PIPELINE_LABEL: "allowed"})
    )
    assert len(deployments) == st["stageCount"] >= 1
    for deployment in deployments:
        (container,) = deployment.spec.template.spec.containers
        assert container.image == "ghcr.io/llmpipe/llmpipe-stage:0.1.0"  # the default profile
        assert container.imagePullPolicy == "IfNotPresent"
        assert all(e.valueFrom is None for e in container.env)
        volumes = {v.name: v for v in deployment.spec.template.spec.volumes}
        assert volumes["model"].hostPath.path == "/var/lib/llmpipe/models/tiny"
    assert_network_policy(client, namespace, "allowed", deployments)


def assert_network_policy(
    client: Client, namespace: str, name: str, deployments: list[Deployment]
) -> None:
    """The pipeline's NetworkPolicy selects exactly its stage pods; gRPC from them only."""
    policy = client.get(NetworkPolicy, f"{name}-network", namespace=namespace)
    selector = policy.spec.podSelector.matchLabels
    assert selector == {PIPELINE_LABEL: name, "app.kubernetes.io/component": "stage"}
    for deployment in deployments:
        assert selector.items() <= deployment.spec.template.metadata.labels.items()
    assert policy.spec.policyTypes == ["Ingress"]
    rules = {rule.ports[0].port: rule for rule in policy.spec.ingress}
    assert set(rules) == {50051, 8000}
    (grpc_peer,) = rules[50051].from_
    assert grpc_peer.podSelector.matchLabels == selector and grpc_peer.namespaceSelector is None
    # The HTTP port by default: `podSelector: {}` alone, every pod of this namespace only.
    (http_peer,) = rules[8000].from_
    assert http_peer.to_dict() == {"podSelector": {}}
    owner = policy.metadata.ownerReferences[0]
    assert (owner.kind, owner.name) == ("LLMPipeline", name)


def test_the_operator_refuses_what_got_past_admission(
    control_plane: cp.ControlPlane,
    client: Client,
    default_policy_operator: OperatorProcess,
    author: Author,
    admission: AdmissionPolicy,
    pool: Pool,
    namespace: str,
) -> None:
    for node in ("a", "b"):
        pool.add(node, tier="cloud", memory="2Gi")
    # A pipeline that runs, before admission is bypassed.
    running = allowed_pipeline("running", pool.selector)
    wait.until(lambda: author.apply(running).returncode == 0, what="running admitted", timeout=30)
    wait_ready(client, default_policy_operator, namespace, "running")
    admission.remove_binding()
    # Admission bypassed: every attack is admitted by the API server ...
    for attack in ATTACKS:
        done = wait.until(
            lambda a=attack: (lambda d: d if d.returncode == 0 else None)(
                author.apply(attacked(f"bypass-{a}", pool.selector, a))
            ),
            what=f"the {attack} spec admitted without the binding",
            timeout=30,
            interval=0.5,
        )
        assert "created" in done.stdout
    # ... and refused by the operator: PolicyViolation, an Event, nothing deployed.
    for attack, (_, message) in ATTACKS.items():
        name = f"bypass-{attack}"
        st = wait_phase(client, default_policy_operator, namespace, name, "Failed")
        planned = condition(st, "Planned")
        assert (planned["status"], planned["reason"]) == ("False", "PolicyViolation")
        assert "refused by the cluster's llmpipe policy" in planned["message"]
        assert message.split(" ", 1)[0] in planned["message"]  # the rule's name
        assert condition(st, "Ready")["reason"] == "PolicyViolation"
        assert_event(client, namespace, name, default_policy_operator)
        assert not list(client.list(Deployment, namespace=namespace, labels={PIPELINE_LABEL: name}))
    # A running pipeline switched to a forbidden image loses what it ran.
    switched = copy.deepcopy(running)
    foreign_image(switched["spec"])
    done = author.apply(switched)
    assert done.returncode == 0, done.stderr
    st = wait_phase(client, default_policy_operator, namespace, "running", "Failed")
    assert condition(st, "Planned")["reason"] == "PolicyViolation"
    assert "[allowedImages]" in condition(st, "Planned")["message"]
    wait.until(
        lambda: (
            not list(
                client.list(Deployment, namespace=namespace, labels={PIPELINE_LABEL: "running"})
            )
        ),
        what="the refused pipeline's Deployments deleted",
        timeout=30,
        seen=lambda: f"{status_of(client, namespace, 'running')}",
    )
    assert status_of(client, namespace, "running").get("planHash") is None


def assert_event(client: Client, namespace: str, name: str, operator: OperatorProcess) -> None:
    def found() -> Event | None:
        for event in client.list(Event, namespace=namespace):
            if event.involvedObject.name == name and event.reason == "PolicyViolation":
                return event
        return None

    event = wait.until(
        found, what=f"a PolicyViolation Event for {name}", timeout=30, seen=operator.log_tail
    )
    assert event.type == "Warning"
    assert "refused by the cluster's llmpipe policy" in (event.message or "")


def test_a_cluster_wide_operator_deploys_only_where_granted(
    control_plane: cp.ControlPlane,
    client: Client,
    crd: object,
    namespace: str,
    pool: Pool,
    tmp_path: Path,
) -> None:
    ungranted = f"ungranted-{uuid.uuid4().hex[:6]}"
    control_plane.create_namespace(ungranted)
    handle = start_operator(
        control_plane, namespace=namespace, workdir=tmp_path / "op", all_namespaces=True
    )
    try:
        for node in ("a", "b"):
            pool.add(node, tier="cloud", memory="2Gi")
        for where in (namespace, ungranted):
            done = kubectl(
                control_plane,
                "apply",
                "-n",
                where,
                "-f",
                "-",
                stdin=yaml.safe_dump(pipeline_manifest("wide", selector=pool.selector)),
            )
            assert done.returncode == 0, done.stderr
        wait_ready(client, handle, namespace, "wide")
        # In the namespace without a RoleBinding: seen (the watch is cluster-wide), every write
        # of a workload forbidden, and the status says so.
        wait.until(
            lambda: (
                f"{ungranted}" in handle.log_tail(200) and "operator's RBAC" in handle.log_tail(200)
            ),
            what="the operator's forbidden write in the ungranted namespace",
            timeout=60,
            seen=handle.log_tail,
        )

        def refused() -> dict[str, Any] | None:
            st = status_of(client, ungranted, "wide")
            return st if condition(st, "Planned").get("reason") == "Forbidden" else None

        st = wait.until(refused, what="Planned=False Forbidden", timeout=60, seen=handle.log_tail)
        assert st["phase"] == "Pending"
        message = condition(st, "Planned")["message"]
        assert f"the operator may not write in namespace {ungranted}" in message
        assert "<release>-workloads ClusterRole" in message
        assert not list(client.list(Deployment, namespace=ungranted))
        assert not list(client.list(NetworkPolicy, namespace=ungranted))
    finally:
        stop_operator(control_plane, handle)
        control_plane.delete_namespace(ungranted)
