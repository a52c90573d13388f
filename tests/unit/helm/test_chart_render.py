"""The chart renders what a user and the operator need, with the real helm binary.

Covers: `helm lint --strict`; the default install (CRD, ServiceAccount, one operator Deployment
with Recreate, liveness probe, restricted securityContext, resources, `--namespace default`,
the policy mounted and passed as `--policy`); namespace scoping (`--namespace` per watched
namespace); the cluster-wide opt-in (`--all-namespaces`, no write permission bound
cluster-wide); refused namespaces (kube-system, the release's own, none at all); the
optional metrics Service and ServiceMonitor (off by default, refused without the Prometheus
Operator API); values the schema refuses with a message naming them; an existing
ServiceAccount; the RBAC bindings' subject is the chart's ServiceAccount. The API server's
acceptance of the same output is in tests/cluster/helm.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llmpipe_operator.manifests import network
from tests.unit.helm.conftest import CHART, Render, by_kind, one, run_helm

WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection", "*"}


def _container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return container


def test_lint_is_clean(helm: str) -> None:
    done = run_helm(helm, "lint", "--strict", str(CHART))
    assert done.returncode == 0, done.stdout + done.stderr


def test_lint_is_clean_with_every_option_on(helm: str) -> None:
    done = run_helm(
        helm,
        "lint",
        "--strict",
        str(CHART),
        "--set",
        "watch.namespaces={team-a,team-b}",
        "--set",
        "metrics.service.enabled=true",
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_default_install_objects(render: Render) -> None:
    objects = render()
    kinds = {o["kind"] for o in objects}
    assert {"CustomResourceDefinition", "ServiceAccount", "Deployment"} <= kinds
    assert "ServiceMonitor" not in kinds and "Service" not in kinds
    crd = one(objects, "CustomResourceDefinition")
    assert crd["metadata"]["name"] == "llmpipelines.llmpipe.io"


def test_operator_deployment_shape(render: Render) -> None:
    objects = render()
    deployment = one(objects, "Deployment")
    assert deployment["metadata"]["namespace"] == "llmpipe-system"
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    container = _container(objects)
    assert container["image"] == "ghcr.io/llmpipe/llmpipe-operator:0.1.0"
    assert container["command"] == ["python", "-m", "llmpipe_operator"]
    assert container["args"] == [
        "--namespace",
        "default",
        "--policy",
        "/etc/llmpipe/policy/policy.json",
        "--health-port",
        "8081",
        "--metrics-port",
        "8080",
        "--operator-namespace",
        "llmpipe-system",
    ]
    # The pipelines' NetworkPolicies admit the operator's pods by these labels.
    assert network.OPERATOR_POD_LABELS.items() <= labels.items()
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]


def test_liveness_probe_targets_the_health_port(render: Render) -> None:
    container = _container(render("operator.healthPort=9090"))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["health"] == 9090
    probe = container["livenessProbe"]
    assert probe["httpGet"] == {"path": "/healthz", "port": "health"}
    assert "--health-port" in container["args"]
    assert container["args"][container["args"].index("--health-port") + 1] == "9090"


def test_security_context_meets_the_restricted_pod_security_standard(render: Render) -> None:
    objects = render()
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    context = _container(objects)["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["readOnlyRootFilesystem"] is True
    assert "hostNetwork" not in pod and "hostPID" not in pod


def test_watched_namespaces_become_namespace_flags(render: Render) -> None:
    args = _container(render("watch.namespaces={team-a,team-b}"))["args"]
    assert "--all-namespaces" not in args
    assert args[:4] == ["--namespace", "team-a", "--namespace", "team-b"]


def test_extra_args_and_env_are_appended(render: Render) -> None:
    container = _container(
        render(
            "operator.extraArgs={--verbose}",
            "operator.extraEnv[0].name=X",
            extra=("--set-string", "operator.extraEnv[0].value=1"),
        )
    )
    assert container["args"][-1] == "--verbose"
    assert {"name": "X", "value": "1"} in container["env"]


def test_metrics_service_selects_the_operator_pod(render: Render) -> None:
    objects = render("metrics.service.enabled=true")
    service = one(objects, "Service")
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"


def test_service_monitor_needs_the_prometheus_operator_api(helm: str) -> None:
    done = run_helm(helm, "template", "demo", str(CHART), "--set", "serviceMonitor.enabled=true")
    assert done.returncode != 0
    assert "monitoring.coreos.com/v1 ServiceMonitor" in done.stderr


def test_service_monitor_scrapes_the_metrics_service(render: Render) -> None:
    objects = render(
        "serviceMonitor.enabled=true",
        "serviceMonitor.labels.release=prom",
        extra=("--api-versions", "monitoring.coreos.com/v1/ServiceMonitor"),
    )
    monitor = one(objects, "ServiceMonitor")
    service = one(objects, "Service")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]


refused = pytest.mark.parametrize(
    ("value", "named"),
    [
        ("replicas=2", "replicas"),
        ("watch.namespaces={Team_A}", "namespaces"),
        ("image.pullPolicy=Sometimes", "pullPolicy"),
        ("operator.healthPort=0", "healthPort"),
        ("serviceMonitor.interval=often", "interval"),
        ("operator.extraEnv[0].name=X,operator.extraEnv[0].value=1", "value"),
    ],
    ids=[
        "unknown-key",
        "bad-namespace",
        "bad-pull-policy",
        "bad-port",
        "bad-duration",
        "env-value-not-string",
    ],
)


@refused
def test_schema_refuses_bad_values_naming_them(helm: str, value: str, named: str) -> None:
    done = run_helm(helm, "template", "demo", str(CHART), "--set", value)
    assert done.returncode != 0
    assert "values don't meet the specifications of the schema" in done.stderr
    assert named in done.stderr


def test_existing_service_account_is_used_and_not_created(render: Render) -> None:
    objects = render("serviceAccount.create=false", "serviceAccount.name=my-operator")
    assert by_kind(objects, "ServiceAccount") == []
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "my-operator"


def test_existing_service_account_needs_a_name(helm: str) -> None:
    done = run_helm(
        helm,
        "template",
        "demo",
        str(CHART),
        "-n",
        "llmpipe-system",
        "--set",
        "serviceAccount.create=false",
    )
    assert done.returncode != 0
    assert "serviceAccount.name must name an existing ServiceAccount" in done.stderr


def test_release_named_llmpipe_is_not_doubled(helm: str) -> None:
    done = run_helm(helm, "template", "llmpipe", str(CHART), "--namespace", "llmpipe-system")
    assert done.returncode == 0, done.stderr
    assert "name: llmpipe\n" in done.stdout and "llmpipe-llmpipe" not in done.stdout


# RBAC: rbac.yaml is the operator's file; the chart's side of the contract is the subject.


def _bindings(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return by_kind(objects, "RoleBinding") + by_kind(objects, "ClusterRoleBinding")


def _need_rbac(objects: list[dict[str, Any]]) -> None:
    if not _bindings(objects):
        pytest.skip("helm/llmpipe/templates/rbac.yaml (operator's file) renders no bindings yet")


@pytest.mark.parametrize(
    "sets",
    [(), ("watch.namespaces={team-a,team-b}",), ("watch.allNamespaces=true",)],
    ids=["default", "scoped", "all"],
)
def test_every_binding_names_the_chart_service_account(
    render: Render, sets: tuple[str, ...]
) -> None:
    objects = render(*sets)
    _need_rbac(objects)
    account = one(objects, "ServiceAccount")["metadata"]
    for binding in _bindings(objects):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
        ], binding["metadata"]["name"]


def test_rbac_off_renders_no_rbac(render: Render) -> None:
    objects = render("rbac.create=false")
    assert not [
        o
        for o in objects
        if o["kind"] in {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"}
    ]


def test_scoped_install_writes_only_in_watched_namespaces(render: Render) -> None:
    objects = render("watch.namespaces={team-a,team-b}")
    _need_rbac(objects)
    for role in by_kind(objects, "ClusterRole"):
        for rule in role.get("rules", []):
            writes = WRITE_VERBS & set(rule.get("verbs", []))
            # Scoped: the children (Deployments, Services, ConfigMaps) are writable only
            # through per-namespace Roles, never through a ClusterRole.
            assert not (
                writes
                and {"apps", ""} & set(rule.get("apiGroups", []))
                and set(rule.get("resources", [])) & {"deployments", "services", "configmaps"}
            ), role
    namespaces = {r["metadata"]["namespace"] for r in by_kind(objects, "RoleBinding")}
    assert {"team-a", "team-b"} <= namespaces


@pytest.mark.parametrize(
    ("sets", "namespaces"),
    [
        (("watch.allNamespaces=true",), None),
        (("watch.namespaces={team-a,team-b}",), ["team-a", "team-b"]),
    ],
    ids=["all", "scoped"],
)
def test_operator_runner_accepts_the_rendered_args(
    render: Render, sets: tuple[str, ...], namespaces: list[str] | None, tmp_path: Path
) -> None:
    from llmpipe_operator import __main__ as runner
    from llmpipe_operator import policy

    objects = render("operator.healthPort=9091", *sets)
    container = _container(objects)
    assert container["command"][-1] == runner.__spec__.parent
    args = runner.parse_args(container["args"])
    assert args.namespace == namespaces
    assert args.all_namespaces is (namespaces is None)
    assert (args.health_port, args.metrics_port) == (9091, 8080)
    assert args.operator_namespace == "llmpipe-system"
    # The file the ConfigMap mounts at --policy is one the runner loads.
    config = next(
        o for o in by_kind(objects, "ConfigMap") if o["metadata"]["name"] == "demo-llmpipe-policy"
    )
    mounted = tmp_path / args.policy.name
    mounted.write_text(config["data"]["policy.json"])
    assert runner.load_policy(mounted) == policy.default_policy()


@pytest.mark.parametrize(
    "sets", [("watch.allNamespaces=true",), ("watch.allNamespaces=true", "watch.namespaces=null")]
)
def test_cluster_wide_watch_binds_no_write_permission_cluster_wide(
    render: Render, sets: tuple[str, ...]
) -> None:
    objects = render(*sets)
    roles = {r["metadata"]["name"]: r for r in by_kind(objects, "ClusterRole")}
    for binding in by_kind(objects, "ClusterRoleBinding"):
        role = roles[binding["roleRef"]["name"]]
        for rule in role["rules"]:
            writes = WRITE_VERBS & set(rule["verbs"])
            # Only the operator's own resource (Kopf's annotations, the status) and Events.
            assert not writes or set(rule["resources"]) <= {
                "llmpipelines",
                "llmpipelines/status",
                "events",
            }, (role["metadata"]["name"], rule)
    workloads = roles["demo-llmpipe-workloads"]
    assert any(
        "deployments" in r["resources"] and "create" in r["verbs"] for r in workloads["rules"]
    )
    granted = [
        b
        for b in by_kind(objects, "RoleBinding")
        if b["roleRef"]["name"] == "demo-llmpipe-workloads"
    ]
    assert all(b["roleRef"]["kind"] == "ClusterRole" for b in granted)
    assert [b["metadata"]["namespace"] for b in granted] == (["default"] if len(sets) == 1 else [])


refused_namespaces = pytest.mark.parametrize(
    ("namespace_args", "message"),
    [
        (("--set", "watch.namespaces={team-a,kube-system}"), 'must not hold "kube-system"'),
        (("--set", "watch.namespaces={llmpipe-system}"), "release's own namespace"),
        (("--set", "watch.namespaces=null"), "watch.namespaces is empty"),
    ],
    ids=["kube-system", "own-namespace", "none"],
)


@refused_namespaces
def test_write_access_is_refused_where_it_is_dangerous(
    helm: str, namespace_args: tuple[str, ...], message: str
) -> None:
    done = run_helm(helm, "template", "demo", str(CHART), "-n", "llmpipe-system", *namespace_args)
    assert done.returncode != 0
    assert message in done.stderr


def test_installing_into_the_watched_default_namespace_says_what_to_do(helm: str) -> None:
    done = run_helm(helm, "template", "demo", str(CHART))  # --namespace default
    assert done.returncode != 0
    assert "install the chart in a namespace of its own" in done.stderr


def test_scoped_rules_include_network_policies(render: Render) -> None:
    role = one(render(), "Role")
    rule = next(r for r in role["rules"] if "networkpolicies" in r["resources"])
    assert rule["apiGroups"] == ["networking.k8s.io"]
    assert {"create", "patch", "get"} <= set(rule["verbs"]) and "delete" not in rule["verbs"]


def test_the_node_probe_is_opt_in(render: Render) -> None:
    objects = render()
    assert "DaemonSet" not in {o["kind"] for o in objects}
    rules = [r for o in by_kind(objects, "ClusterRole") for r in o["rules"]]
    assert not any("nodes" in r["resources"] and "patch" in r["verbs"] for r in rules)
    assert "--probe-namespace" not in _container(objects)["args"]


def test_the_node_probe_has_no_api_rights_and_a_restricted_pod(render: Render) -> None:
    objects = render("probe.enabled=true")
    daemonset = one(objects, "DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["command"] == ["python", "-m", "llmpipe_stage.probe"]
    assert "cpu" not in container["resources"].get("limits", {})  # it measures the node
    priority = one(objects, "PriorityClass")
    assert pod["priorityClassName"] == priority["metadata"]["name"]
    assert priority["value"] < 0 and priority["preemptionPolicy"] == "Never"
    labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "node-probe"
    args = _container(objects)["args"]
    assert args[args.index("--probe-namespace") + 1] == daemonset["metadata"]["namespace"]
    rules = [r for o in by_kind(objects, "ClusterRole") for r in o["rules"]]
    assert any("nodes" in r["resources"] and r["verbs"] == ["patch"] for r in rules)


def test_operator_runner_accepts_the_probe_args(render: Render) -> None:
    from llmpipe_operator import __main__ as runner

    objects = render("probe.enabled=true", "probe.pollSeconds=30", "probe.linksIntervalSeconds=600")
    args = runner.parse_args(_container(objects)["args"])
    assert args.probe_namespace == one(objects, "DaemonSet")["metadata"]["namespace"]
    assert (args.probe_interval, args.probe_links_interval) == (30.0, 600.0)
    probe_args = one(objects, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["args"]
    from llmpipe_stage import probe

    parsed = probe.parse_args(probe_args)
    assert (parsed.port, parsed.link_port) == (8090, 8091)
    assert parsed.layer_shape == probe.DEFAULT_LAYER_SHAPE


def test_the_probe_measures_products_on_the_given_layer_shape(render: Render) -> None:
    from llmpipe_stage import probe

    objects = render("probe.enabled=true", "probe.layerShape=2048\\,5632\\,32\\,4")
    args = one(objects, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert probe.parse_args(args).layer_shape == probe.LayerShape(2048, 5632, 32, 4)
