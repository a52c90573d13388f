"""The Helm chart against the real API server: dry-run, install, upgrade, uninstall.

Covers: `helm template` output (default, namespace-scoped, metrics Service on, node probe
on) accepted by a server-side dry-run apply; `helm install --wait` creates the operator
Deployment (Recreate, scheduled by the real scheduler onto our own simulated node, made
Running by kwok) and the
CRD is Established and served (`kubectl get llmp`); the example pipelines pass the CRD's
OpenAPI + CEL validation and a bad one is refused with the rule's message; the chart's RBAC
gives the operator's ServiceAccount what it needs and no more (`kubectl auth can-i`): by
default it writes only in `default`, never in kube-system, its own namespace or a namespace
without pipelines; `helm upgrade` to namespace scoping rewrites the runner's flags and moves
write access into the watched namespaces only; the cluster-wide opt-in reads everywhere but
writes only where a RoleBinding grants it (one rendered, one added by `kubectl create
rolebinding` as NOTES says), never in kube-system or its own namespace; `helm uninstall`
removes the release and keeps the CRD and the users' pipelines (Helm never deletes CRDs from
`crds/`).

The tests in this module run in file order and share one release (install -> upgrade ->
uninstall), in namespaces and on a node of their own.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from lightkube import ApiError
from lightkube.resources.apiextensions_v1 import CustomResourceDefinition
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import Pod, ServiceAccount
from lightkube.resources.rbac_authorization_v1 import ClusterRole, ClusterRoleBinding

from tests.support import control_plane as cp
from tests.support import wait

REPO = Path(__file__).resolve().parents[3]
CHART = REPO / "helm" / "llmpipe"
EXAMPLES = sorted((REPO / "examples" / "pipelines").glob("*.yaml"))
CRD_NAME = "llmpipelines.llmpipe.io"


@dataclass
class Release:
    plane: cp.ControlPlane
    name: str
    namespace: str
    watched: tuple[str, str]
    unwatched: str
    node: str
    helm_home: Path

    @property
    def env(self) -> dict[str, str]:
        return {
            **self.plane.env,
            "HELM_CACHE_HOME": str(self.helm_home / "cache"),
            "HELM_CONFIG_HOME": str(self.helm_home / "config"),
            "HELM_DATA_HOME": str(self.helm_home / "data"),
        }

    def run(
        self, tool: str, *args: str, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.plane.bin_dir / tool), *args],
            input=stdin,
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
            timeout=240,
        )

    def helm(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run("helm", *args, "--namespace", self.namespace)

    def kubectl(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.run("kubectl", *args, stdin=stdin)

    @property
    def pin(self) -> list[str]:
        """Values that put the operator pod on our own node."""
        return ["--set-string", f"nodeSelector.kubernetes\\.io/hostname={self.node}"]

    @property
    def account(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.name}"

    def can(self, verb: str, resource: str, namespace: str | None = None) -> bool:
        """`kubectl auth can-i` as the operator's ServiceAccount; `resource/sub` for a
        subresource; no namespace means in every namespace."""
        resource, _, sub = resource.partition("/")
        where = ["--namespace", namespace] if namespace else ["--all-namespaces"]
        extra = [f"--subresource={sub}"] if sub else []
        done = self.kubectl("auth", "can-i", verb, resource, *extra, "--as", self.account, *where)
        assert done.stdout.strip() in ("yes", "no"), done.stdout + done.stderr
        return done.stdout.strip() == "yes"


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"{done.args}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def release(
    control_plane: cp.ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Release]:
    tag = uuid.uuid4().hex[:6]
    rel = Release(
        plane=control_plane,
        name=f"llmpipe-helm-{tag}",
        namespace=f"helm-system-{tag}",
        watched=(f"helm-team-a-{tag}", f"helm-team-b-{tag}"),
        unwatched=f"helm-other-{tag}",
        node=f"helm-node-{tag}",
        helm_home=tmp_path_factory.mktemp("helm-home"),
    )
    namespaces = [rel.namespace, *rel.watched, rel.unwatched]
    for namespace in namespaces:
        control_plane.create_namespace(namespace)
    # Pod Security Admission enforces the "restricted" standard in the release namespace:
    # an operator pod that breaks it is never created and the install's --wait fails.
    control_plane.kubectl(
        "label",
        "namespace",
        rel.namespace,
        "pod-security.kubernetes.io/enforce=restricted",
        "pod-security.kubernetes.io/warn=restricted",
    )
    control_plane.add_node(rel.node, tier="cloud", memory="8Gi")
    try:
        yield rel
    finally:
        rel.helm("uninstall", rel.name, "--wait", "--timeout", "60s")
        for namespace in namespaces:
            control_plane.delete_namespace(namespace)
        control_plane.remove_node(rel.node)


def template(rel: Release, *values: str) -> str:
    return ok(rel.helm("template", rel.name, str(CHART), "--include-crds", *rel.pin, *values))


variants = pytest.mark.parametrize(
    "values",
    [
        (),
        ("--set", "watch.namespaces={WATCHED}"),
        ("--set", "watch.allNamespaces=true"),
        ("--set", "metrics.service.enabled=true"),
        ("--set", "probe.enabled=true"),
    ],
    ids=["default", "namespace-scoped", "cluster-wide", "metrics-service", "node-probe"],
)


@variants
def test_template_passes_server_side_dry_run(release: Release, values: tuple[str, ...]) -> None:
    values = tuple(v.replace("WATCHED", ",".join(release.watched)) for v in values)
    manifests = template(release, *values)
    kinds = {doc["kind"] for doc in yaml.safe_load_all(manifests) if doc}
    assert {"CustomResourceDefinition", "Deployment", "ServiceAccount"} <= kinds
    done = release.kubectl(
        "apply",
        "--server-side",
        "--dry-run=server",
        "--field-manager=llmpipe-helm-test",
        "-f",
        "-",
        stdin=manifests,
    )
    ok(done)
    assert "(server dry run)" in done.stdout


def test_install_creates_the_operator_deployment(release: Release) -> None:
    done = release.helm(
        "install", release.name, str(CHART), *release.pin, "--wait", "--timeout", "120s"
    )
    notes = ok(done)
    assert "violate PodSecurity" not in done.stderr, done.stderr
    # NOTES.txt: what to do next, with this release's names filled in.
    assert f"kubectl -n {release.namespace} rollout status deployment/{release.name}" in notes
    assert "The operator watches LLMPipelines in: default." in notes
    assert "kubectl apply -n default -f examples/pipelines/edge-cloud-privacy.yaml" in notes
    client = release.plane.client()
    deployment = wait.deployment_available(client, release.name, release.namespace, timeout=60)
    assert deployment.spec.strategy.type == "Recreate"
    assert deployment.spec.replicas == 1
    (container,) = deployment.spec.template.spec.containers
    assert container.args[:2] == ["--namespace", "default"]
    assert container.args[2:4] == ["--policy", "/etc/llmpipe/policy/policy.json"]
    pods = list(
        client.list(
            Pod, namespace=release.namespace, labels={"app.kubernetes.io/instance": release.name}
        )
    )
    assert [pod.spec.nodeName for pod in pods] == [release.node]
    assert client.get(ServiceAccount, release.name, namespace=release.namespace)
    status = json.loads(ok(release.helm("status", release.name, "-o", "json")))
    assert status["info"]["status"] == "deployed" and status["version"] == 1


def test_crd_is_established_and_served(release: Release) -> None:
    crd = release.plane.client().get(CustomResourceDefinition, CRD_NAME)
    conditions = {c.type: c.status for c in crd.status.conditions}
    assert conditions.get("Established") == "True"
    done = release.kubectl("get", "llmp", "--namespace", release.namespace)
    ok(done)
    assert "No resources found" in done.stderr
    resources = ok(release.kubectl("api-resources", "--api-group=llmpipe.io", "-o", "name"))
    assert resources.split() == [CRD_NAME]


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_passes_the_crd_validation(release: Release, example: Path) -> None:
    done = release.kubectl(
        "apply",
        "--server-side",
        "--dry-run=server",
        "--namespace",
        release.namespace,
        "-f",
        str(example),
    )
    ok(done)


def test_bad_pipeline_is_refused_with_the_rule_message(release: Release) -> None:
    bad = yaml.safe_load((REPO / "examples" / "pipelines" / "edge-only.yaml").read_text())
    bad["spec"]["model"]["source"]["hostPath"] = {"path": "/models/qwen"}
    bad["spec"]["placement"]["maxStages"] = 0
    done = release.kubectl(
        "apply",
        "--dry-run=server",
        "--namespace",
        release.namespace,
        "-f",
        "-",
        stdin=yaml.safe_dump(bad),
    )
    assert done.returncode != 0
    assert "model.source must set exactly one of pvc, hostPath, huggingFace or gguf" in done.stderr
    assert "spec.placement.maxStages" in done.stderr


def test_default_install_writes_only_in_the_default_namespace(release: Release) -> None:
    assert release.can("watch", "llmpipelines.llmpipe.io", "default")
    assert release.can("patch", "llmpipelines.llmpipe.io/status", "default")
    for kind in ("deployments.apps", "services", "configmaps", "networkpolicies.networking.k8s.io"):
        assert release.can("create", kind, "default"), kind
    for namespace in ("kube-system", release.namespace, *release.watched, release.unwatched):
        assert not release.can("create", "deployments.apps", namespace), namespace
        assert not release.can("patch", "deployments.apps", namespace), namespace
        assert not release.can("create", "services", namespace), namespace
    assert release.can("list", "nodes")
    assert release.can("watch", "nodes")


def test_operator_account_gets_no_more_than_it_needs(release: Release) -> None:
    assert not release.can("delete", "nodes")
    assert not release.can("patch", "nodes")
    assert not release.can("create", "customresourcedefinitions.apiextensions.k8s.io")
    assert not release.can("create", "clusterrolebindings.rbac.authorization.k8s.io")
    assert not release.can("create", "pods/exec", release.unwatched)
    assert not release.can("*", "*", release.unwatched)


def test_upgrade_to_namespace_scoping(release: Release) -> None:
    watched = ",".join(release.watched)
    ok(
        release.helm(
            "upgrade",
            release.name,
            str(CHART),
            *release.pin,
            "--set",
            f"watch.namespaces={{{watched}}}",
            "--wait",
            "--timeout",
            "120s",
        )
    )
    client = release.plane.client()
    deployment = wait.deployment_available(client, release.name, release.namespace, timeout=60)
    (container,) = deployment.spec.template.spec.containers
    a, b = release.watched
    assert container.args[:4] == ["--namespace", a, "--namespace", b]
    assert "--all-namespaces" not in container.args
    status = json.loads(ok(release.helm("status", release.name, "-o", "json")))
    assert status["info"]["status"] == "deployed" and status["version"] == 2
    assert f"The operator watches LLMPipelines in: {a}, {b}." in status["info"]["notes"]
    for namespace in release.watched:
        assert release.can("create", "deployments.apps", namespace)
        assert release.can("patch", "llmpipelines.llmpipe.io/status", namespace)
    assert not release.can("create", "deployments.apps", release.unwatched)
    assert not release.can("create", "services", release.unwatched)
    assert not release.can("create", "deployments.apps", "default")
    assert not release.can("create", "deployments.apps", "kube-system")
    assert release.can("list", "nodes")


def test_upgrade_to_the_cluster_wide_opt_in_still_writes_only_where_granted(
    release: Release,
) -> None:
    granted, other = release.watched
    done = release.helm(
        "upgrade",
        release.name,
        str(CHART),
        *release.pin,
        "--set",
        "watch.allNamespaces=true",
        "--set",
        f"watch.namespaces={{{granted}}}",
        "--wait",
        "--timeout",
        "120s",
    )
    notes = ok(done)
    assert "WARNING: cluster-wide watch" in notes
    deployment = wait.deployment_available(
        release.plane.client(), release.name, release.namespace, timeout=60
    )
    (container,) = deployment.spec.template.spec.containers
    assert container.args[:1] == ["--all-namespaces"]
    everywhere = ("kube-system", release.namespace, granted, other, release.unwatched)
    for namespace in everywhere:  # reads for the cluster-wide watch
        assert release.can("watch", "llmpipelines.llmpipe.io", namespace), namespace
        assert release.can("patch", "llmpipelines.llmpipe.io/status", namespace), namespace
        assert release.can("watch", "deployments.apps", namespace), namespace
    assert release.can("create", "deployments.apps", granted)
    assert release.can("create", "networkpolicies.networking.k8s.io", granted)
    for namespace in ("kube-system", release.namespace, other, release.unwatched):
        assert not release.can("create", "deployments.apps", namespace), namespace
        assert not release.can("delete", "services", namespace), namespace
        assert not release.can("create", "configmaps", namespace), namespace
        assert not release.can("get", "secrets", namespace), namespace
    # Onboarding a namespace is one RoleBinding, as NOTES says.
    command = next(line for line in notes.splitlines() if "kubectl create rolebinding" in line)
    assert f"{release.name}-workloads -n <namespace>" in command
    ok(
        release.kubectl(
            "create",
            "rolebinding",
            f"{release.name}-workloads",
            "-n",
            other,
            f"--clusterrole={release.name}-workloads",
            f"--serviceaccount={release.namespace}:{release.name}",
        )
    )
    assert release.can("create", "deployments.apps", other)
    assert not release.can("create", "deployments.apps", release.unwatched)


def test_uninstall_removes_the_release_and_keeps_crd_and_pipelines(release: Release) -> None:
    example = REPO / "examples" / "pipelines" / "edge-only.yaml"
    ok(release.kubectl("apply", "--namespace", release.watched[0], "-f", str(example)))
    client = release.plane.client()
    roles = [r.metadata.name for r in client.list(ClusterRole) if release.name in r.metadata.name]
    ok(release.helm("uninstall", release.name, "--wait", "--timeout", "60s"))
    for kind, name, namespace in (
        (Deployment, release.name, release.namespace),
        (ServiceAccount, release.name, release.namespace),
        *((ClusterRole, role, None) for role in roles),
    ):
        with pytest.raises(ApiError) as gone:
            client.get(kind, name, namespace=namespace)
        assert gone.value.status.code == 404, (kind, name)
    assert not [b for b in client.list(ClusterRoleBinding) if release.name in b.metadata.name]
    assert client.get(CustomResourceDefinition, CRD_NAME)
    kept = ok(release.kubectl("get", "llmp", "qwen-edge", "--namespace", release.watched[0]))
    assert "qwen-edge" in kept
