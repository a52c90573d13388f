"""The chart's rendering of the admin's policy (templates/policy.yaml, _policy.tpl).

Covers: the operator's ConfigMap holds the values' policy as JSON that the operator's parser
reads back to the same Policy (defaults and a custom one); the Deployment mounts it and
restarts on a change (checksum annotation); the ValidatingAdmissionPolicy's image regexes
are the Python ones (same verdict on a matrix of images); the binding covers the watched
namespaces only, or every namespace with the cluster-wide opt-in; admission off renders no
policy objects but keeps the operator's ConfigMap; an unknown default profile is refused.
What the API server makes of the CEL is tested in tests/cluster/helm/test_security.py.
"""

from __future__ import annotations

import json
import re

from llmpipe_operator import policy
from tests.unit.helm.conftest import CHART, Render, by_kind, one, run_helm

CUSTOM = (
    "policy.runtimeProfiles.gpu.image=registry.corp/llm/stage-cu128:0.1.0",
    "policy.runtimeProfiles.gpu.imagePullPolicy=Always",
    "policy.runtimeProfiles.gpu.allowedDevices={nvidia.com/gpu}",
    "policy.runtimeProfiles.gpu.runtimeClassName=nvidia",
    "policy.allowedImages={registry.corp/llm/*,ghcr.io/llmpipe/llmpipe-stage:*}",
    "policy.allowedHostPaths={/srv/models/,/}",
)


def _policy_of(objects: list[dict]) -> policy.Policy:
    (config,) = [
        o for o in by_kind(objects, "ConfigMap") if o["metadata"]["name"].endswith("-policy")
    ]
    return policy.parse_policy(json.loads(config["data"]["policy.json"]))


def _variables(objects: list[dict]) -> dict[str, str]:
    vap = one(objects, "ValidatingAdmissionPolicy")
    return {v["name"]: v["expression"] for v in vap["spec"]["variables"]}


def test_the_operator_reads_back_the_default_policy(render: Render) -> None:
    assert _policy_of(render()) == policy.default_policy()


def test_the_operator_reads_back_a_custom_policy(render: Render) -> None:
    read = _policy_of(render(*CUSTOM))
    assert set(read.profiles) == {"default", "gpu"}
    assert read.profiles["gpu"].allowed_devices == frozenset({"nvidia.com/gpu"})
    assert read.profiles["gpu"].image_pull_policy == "Always"
    assert read.profiles["gpu"].runtime_class_name == "nvidia"
    assert read.allowed_host_paths == ("/srv/models", "")


def test_the_deployment_mounts_the_policy_and_restarts_on_a_change(render: Render) -> None:
    def pod(objects: list[dict]) -> dict:
        return one(objects, "Deployment")["spec"]["template"]

    default, custom = pod(render()), pod(render(*CUSTOM))
    (container,) = default["spec"]["containers"]
    path = container["args"][container["args"].index("--policy") + 1]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "policy")
    assert path == f"{mount['mountPath']}/policy.json" and mount["readOnly"] is True
    volume = next(v for v in default["spec"]["volumes"] if v["name"] == "policy")
    assert volume["configMap"]["name"] == "demo-llmpipe-policy"
    key = "llmpipe.io/policy-checksum"
    assert default["metadata"]["annotations"][key] != custom["metadata"]["annotations"][key]


IMAGES = [
    "ghcr.io/llmpipe/llmpipe-stage:0.1.0",
    "ghcr.io/llmpipe/llmpipe-stage-evil:1",
    "ghcrXio/llmpipe/llmpipe-stage:1",
    "registry.corp/llm/x:1",
    "registry.corp/llm/a/b:1",
    "registry.corp.evil/llm/x:1",
    "evil.example/exfil:latest",
]


def test_admission_regexes_agree_with_the_operators(render: Render) -> None:
    regexes = json.loads(_variables(render(*CUSTOM))["imagePatterns"])
    patterns = ["registry.corp/llm/*", "ghcr.io/llmpipe/llmpipe-stage:*"]
    for image in IMAGES:
        admission = any(re.search(r, image) for r in regexes)
        operator = any(re.fullmatch(policy.image_pattern_regex(p), image) for p in patterns)
        assert admission is operator, image


def test_admission_lists_are_the_values(render: Render) -> None:
    variables = _variables(render(*CUSTOM))
    assert json.loads(variables["profileDevices"]) == {"default": [], "gpu": ["nvidia.com/gpu"]}
    assert set(json.loads(variables["profileImages"])) == {
        "ghcr.io/llmpipe/llmpipe-stage:0.1.0",
        "registry.corp/llm/stage-cu128:0.1.0",
    }
    assert json.loads(variables["hostPrefixes"]) == ["/srv/models", ""]


def test_the_binding_follows_the_watched_namespaces(render: Render) -> None:
    scoped = one(render("watch.namespaces={team-a,team-b}"), "ValidatingAdmissionPolicyBinding")
    (expression,) = scoped["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"]
    assert expression == {
        "key": "kubernetes.io/metadata.name",
        "operator": "In",
        "values": ["team-a", "team-b"],
    }
    wide = one(render("watch.allNamespaces=true"), "ValidatingAdmissionPolicyBinding")
    assert "matchResources" not in wide["spec"]
    assert wide["spec"]["validationActions"] == ["Deny"]
    assert (
        wide["spec"]["policyName"] == one(render(), "ValidatingAdmissionPolicy")["metadata"]["name"]
    )


def test_admission_off_keeps_the_operators_check(render: Render) -> None:
    objects = render("policy.admission.enabled=false")
    assert not by_kind(objects, "ValidatingAdmissionPolicy")
    assert not by_kind(objects, "ValidatingAdmissionPolicyBinding")
    assert _policy_of(objects) == policy.default_policy()


def test_an_unknown_default_profile_is_refused(helm: str) -> None:
    done = run_helm(
        helm, "template", "demo", str(CHART), "-n", "x", "--set", "policy.defaultProfile=gpu"
    )
    assert done.returncode != 0
    assert (
        'policy.defaultProfile "gpu" is not one of policy.runtimeProfiles (default)' in done.stderr
    )
