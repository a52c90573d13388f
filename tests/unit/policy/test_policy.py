"""The cluster admin's policy (llmpipe_operator.policy), on parsed specs.

Covers: the safe default (only the project's stage image, host paths under
/var/lib/llmpipe/models); each rule refusing what it must (foreign image, valueFrom of any
kind, code-loading env, hostPath outside the prefixes or with `..`, unknown profile, a
device the profile does not allow) with the rule's name in the message; image patterns
(`*` stops at `/`); resolution from the profile (image, pull policy, default resources
overridden key by key); the policy file parser's errors.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from llmpipe_operator import policy
from llmpipe_operator import spec as spec_mod
from tests.unit.manifests.builders import a_spec

REPO = Path(__file__).resolve().parents[3]
DEFAULT = policy.default_policy()

GPU_POLICY = policy.parse_policy(
    {
        "defaultProfile": "cpu",
        "runtimeProfiles": {
            "cpu": {"image": "ghcr.io/llmpipe/llmpipe-stage:0.1.0"},
            "gpu": {
                "image": "registry.corp/llm/stage-cu128:0.1.0",
                "imagePullPolicy": "Always",
                "resources": {
                    "requests": {"cpu": "2", "memory": "8Gi"},
                    "limits": {"memory": "16Gi"},
                },
                "allowedDevices": ["nvidia.com/gpu"],
            },
        },
        "allowedImages": ["registry.corp/llm/*"],
        "allowedHostPaths": ["/srv/models/", "/data"],
    }
)


def rules(spec: spec_mod.PipelineSpec, rules_of: policy.Policy = DEFAULT) -> list[str]:
    return [v.rule for v in policy.check(spec, rules_of)]


def test_the_default_policy_allows_the_default_spec_and_fills_in_the_project_image() -> None:
    spec = a_spec().parsed()
    assert spec.runtime.image is None
    resolved = policy.resolve(spec, DEFAULT)
    assert resolved.runtime.image == "ghcr.io/llmpipe/llmpipe-stage:0.1.0"
    assert resolved.runtime.image_pull_policy == "IfNotPresent"
    assert resolved.runtime.profile == "default"


attacks = pytest.mark.parametrize(
    "mutate, rule, text",
    [
        (lambda b: b.runtime(image="evil.example/exfil:latest"), "allowedImages", "evil.example"),
        (
            lambda b: b.runtime(
                env=[{"name": "X", "valueFrom": {"secretKeyRef": {"name": "db", "key": "pw"}}}]
            ),
            "literalEnv",
            "valueFrom is not allowed",
        ),
        (
            lambda b: b.runtime(env=[{"name": "N", "valueFrom": {"fieldRef": {"fieldPath": "x"}}}]),
            "literalEnv",
            "valueFrom",
        ),
        (
            lambda b: b.runtime(env=[{"name": "LD_PRELOAD", "value": "/models/x.so"}]),
            "literalEnv",
            "LD_PRELOAD",
        ),
        (
            lambda b: b.runtime(env=[{"name": "PYTHONPATH", "value": "/models"}]),
            "literalEnv",
            "PYTHONPATH",
        ),
        (lambda b: b.source(hostPath={"path": "/etc"}), "hostPathPrefixes", "'/etc'"),
        (
            lambda b: b.source(hostPath={"path": "/var/lib/llmpipe/models/../../../etc"}),
            "hostPathPrefixes",
            "..",
        ),
        (
            lambda b: b.source(hostPath={"path": "/var/lib/llmpipe/models-evil"}),
            "hostPathPrefixes",
            "models-evil",
        ),
        (lambda b: b.source(gguf={"hostPath": "/etc/x.gguf"}), "hostPathPrefixes", "gguf.hostPath"),
        (
            lambda b: b.draft(hostPath={"path": "/etc"}),
            "hostPathPrefixes",
            "spec.model.draft.source.hostPath.path '/etc'",
        ),
        (
            lambda b: b.draft(gguf={"hostPath": "/var/lib/llmpipe/models/../x.gguf"}),
            "hostPathPrefixes",
            "spec.model.draft.source.gguf.hostPath",
        ),
        (lambda b: b.runtime(profile="gpu"), "runtimeProfile", "'gpu' is not a runtime profile"),
        (
            lambda b: b.runtime(resources={"limits": {"nvidia.com/gpu": 1}}),
            "allowedDevices",
            "nvidia.com/gpu",
        ),
    ],
    ids=[
        "foreign-image",
        "secret-key-ref",
        "field-ref",
        "ld-preload",
        "pythonpath",
        "host-etc",
        "host-dotdot",
        "host-sibling-prefix",
        "gguf-host-etc",
        "draft-host-etc",
        "draft-gguf-dotdot",
        "unknown-profile",
        "device",
    ],
)


@attacks
def test_the_default_policy_refuses_each_attack_naming_the_rule(mutate, rule, text) -> None:
    builder = a_spec()
    mutate(builder)
    spec = builder.parsed()
    assert rules(spec) == [rule]
    with pytest.raises(policy.PolicyViolation, match=re.escape(f"[{rule}]")) as refused:
        policy.resolve(spec, DEFAULT)
    assert text in str(refused.value)


def test_every_violation_is_reported_at_once() -> None:
    spec = (
        a_spec()
        .source(hostPath={"path": "/etc"})
        .runtime(image="evil:1", env=[{"name": "A", "valueFrom": {"configMapKeyRef": {}}}])
        .parsed()
    )
    assert sorted(rules(spec)) == ["allowedImages", "hostPathPrefixes", "literalEnv"]


def test_allowed_things_pass() -> None:
    spec = (
        a_spec()
        .source(hostPath={"path": "/var/lib/llmpipe/models/tiny"})
        .runtime(
            image="ghcr.io/llmpipe/llmpipe-stage:0.2.0",
            env=[{"name": "OMP_NUM_THREADS", "value": "4"}],
            resources={"requests": {"cpu": "1", "memory": "1Gi", "hugepages-2Mi": "64Mi"}},
        )
        .parsed()
    )
    assert rules(spec) == []
    assert rules(a_spec().pvc("models").parsed()) == []
    assert rules(a_spec().hugging_face("org/model", secret="hf").parsed()) == []
    assert rules(a_spec().source(hostPath={"path": "/var/lib/llmpipe/models"}).parsed()) == []
    gguf = a_spec().source(gguf={"hostPath": "/var/lib/llmpipe/models/m-q8_0.gguf"})
    assert rules(gguf.parsed()) == []
    assert rules(a_spec().source(gguf={"pvc": {"claimName": "m", "path": "m.gguf"}}).parsed()) == []


patterns = pytest.mark.parametrize(
    "pattern, image, matches",
    [
        ("ghcr.io/llmpipe/llmpipe-stage:*", "ghcr.io/llmpipe/llmpipe-stage:0.1.0", True),
        ("ghcr.io/llmpipe/llmpipe-stage:*", "ghcr.io/llmpipe/llmpipe-stage-evil:1", False),
        ("ghcr.io/llmpipe/llmpipe-stage:*", "ghcr.io/llmpipe/llmpipe-stage:1/../x", False),
        ("ghcr.io/llmpipe/llmpipe-stage@*", "ghcr.io/llmpipe/llmpipe-stage@sha256:ab", True),
        ("registry.corp/*", "registry.corp/app:1", True),
        ("registry.corp/*", "registry.corp/team/app:1", False),
        ("registry.corp*", "registry.corp.evil.com/app:1", False),
        ("registry.corp/*/*", "registry.corp/team/app:1", True),
        ("a.b/c:1", "aXb/c:1", False),
    ],
)


@patterns
def test_image_patterns_star_stops_at_a_slash_and_the_rest_is_literal(
    pattern: str, image: str, matches: bool
) -> None:
    assert bool(re.fullmatch(policy.image_pattern_regex(pattern), image)) is matches


def test_a_profile_supplies_image_pull_policy_and_default_resources() -> None:
    spec = (
        a_spec()
        .source(hostPath={"path": "/srv/models/qwen"})
        .runtime(profile="gpu", resources={"limits": {"nvidia.com/gpu": 1, "memory": "20Gi"}})
        .parsed()
    )
    resolved = policy.resolve(spec, GPU_POLICY).runtime
    assert resolved.image == "registry.corp/llm/stage-cu128:0.1.0"
    assert resolved.image_pull_policy == "Always"
    assert resolved.resources == {
        "requests": {"cpu": "2", "memory": "8Gi"},
        "limits": {"memory": "20Gi", "nvidia.com/gpu": 1},
    }


def test_devices_follow_the_chosen_profile() -> None:
    gpu = (
        a_spec()
        .source(hostPath={"path": "/data/m"})
        .runtime(resources={"limits": {"nvidia.com/gpu": 1}})
    )
    assert rules(gpu.parsed(), GPU_POLICY) == ["allowedDevices"]  # default profile: cpu
    gpu.runtime(profile="gpu")
    assert rules(gpu.parsed(), GPU_POLICY) == []


def test_a_pattern_or_profile_image_with_a_spec_pull_policy() -> None:
    spec = (
        a_spec()
        .source(hostPath={"path": "/data"})
        .runtime(image="registry.corp/llm/other:2", imagePullPolicy="Never")
        .parsed()
    )
    resolved = policy.resolve(spec, GPU_POLICY).runtime
    assert (resolved.image, resolved.image_pull_policy, resolved.profile) == (
        "registry.corp/llm/other:2",
        "Never",
        "cpu",
    )
    # A host path prefix with a trailing slash is the directory itself.
    assert rules(a_spec().source(hostPath={"path": "/srv/models"}).parsed(), GPU_POLICY) == []
    assert rules(a_spec().source(hostPath={"path": "/srv/modelsX"}).parsed(), GPU_POLICY) == [
        "hostPathPrefixes"
    ]


bad_files = pytest.mark.parametrize(
    "raw, message",
    [
        ({}, "runtimeProfiles must name at least one profile"),
        ({"runtimeProfiles": {"a": {}}}, "policy.runtimeProfiles.a.image is required"),
        (
            {"runtimeProfiles": {"a": {"image": "x"}}, "defaultProfile": "b"},
            "defaultProfile 'b' is not one of runtimeProfiles (a)",
        ),
        (
            {"runtimeProfiles": {"default": {"image": "x", "imagePullPolicy": "Sometimes"}}},
            "imagePullPolicy must be one of",
        ),
        (
            {"runtimeProfiles": {"default": {"image": "x"}}, "allowedHostPaths": ["relative"]},
            "must be absolute",
        ),
        (
            {"runtimeProfiles": {"default": {"image": "x"}}, "allowedImages": "x"},
            "list of non-empty",
        ),
    ],
)


@bad_files
def test_an_unusable_policy_file_is_refused_naming_the_key(raw, message) -> None:
    with pytest.raises(policy.PolicyError, match=re.escape(message)):
        policy.parse_policy(raw)


def test_the_chart_default_values_are_the_built_in_default() -> None:
    values = yaml.safe_load((REPO / "helm" / "llmpipe" / "values.yaml").read_text())
    assert policy.parse_policy(values["policy"]) == DEFAULT
