"""spec.model.draft on a real control plane, with the operator as a real process.

Covers: a pipeline with `speculation: draft` and a draft model is stored, planned with the
draft's memory on stage 0 (status.plan and the plan ConfigMap say how much), and Ready;
stage 0's pod, bound by the real scheduler to its planned node, carries the draft model's
volume, read-only mount and `--draft-model-dir`, and requests the memory that includes it;
the other stages' pods carry none of it; pipeline.json says `speculation: draft`; the API
server refuses a draft without `speculation: draft`, `speculation: draft` without a draft,
a draft of another vocabulary, and a draft with two sources (the CRD's CEL); a draft too
large for any node stage 0 may use leaves the pipeline unplanned, the message naming it.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from lightkube import ApiError, Client
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import ConfigMap

from llmpipe_operator.planning import profiles
from tests.cluster.operator.conftest import MODEL_CONFIG, OperatorProcess, Pool, pipeline_manifest
from tests.cluster.operator.test_operator import (
    LLMPipeline,
    apply,
    assert_pods_on_planned_nodes,
    condition,
    stage_pods,
    wait_planned_false,
    wait_ready,
)
from tests.support import control_plane as cp

DRAFT_CONFIG: dict[str, Any] = {
    # the model's vocabulary in 2 small layers: ~78 MB of weights in bfloat16, 16 MiB of
    # KV cache for the default 4 sequences of 2,048 tokens
    **MODEL_CONFIG,
    "num_hidden_layers": 2,
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
}
DRAFT_PATH = "/var/lib/llmpipe/models/tiny-draft"


@pytest.fixture
def client(control_plane: cp.ControlPlane) -> Client:
    return control_plane.client()


def drafted(name: str, selector: dict[str, str], config: dict[str, Any] = DRAFT_CONFIG) -> Any:
    manifest = pipeline_manifest(
        name,
        selector=selector,
        placement={"firstStage": "edge", "maxStages": 3},
        workload={"speculation": "draft"},
    )
    manifest["spec"]["model"]["draft"] = {
        "source": {"hostPath": {"path": DRAFT_PATH}},
        "config": dict(config),
    }
    return manifest


def draft_bytes(config: dict[str, Any], *, sequences: int = 4, context: int = 2048) -> int:
    """The draft's term of docs/planning.md: its weights at stage 0's 2 bytes a parameter
    plus its KV cache for the workload."""
    profile = profiles.from_config(config, dtype="bfloat16")
    kv = sequences * context * profile.kv_bytes_per_token_per_layer * profile.num_layers
    return profile.total_weight_bytes + kv


def test_a_draft_pipeline_plans_the_draft_on_stage_0_and_renders_only_its_pod_with_it(
    control_plane: cp.ControlPlane,
    operator: OperatorProcess,
    namespace: str,
    pool: Pool,
    client: Client,
) -> None:
    for node in ("edge-a", "edge-b", "edge-c"):
        pool.add(node, tier="edge", memory="400Mi", tflops=1.0, uplink_mbps=300)
    result = apply(control_plane, namespace, drafted("draft", pool.selector))
    assert result.returncode == 0, result.stderr

    st = wait_ready(client, operator, namespace, "draft")
    assert_pods_on_planned_nodes(client, namespace, "draft", st)
    first, *rest = st["plan"]["stages"]
    assert rest, "the model needs more than one 400Mi node"
    expected = draft_bytes(DRAFT_CONFIG)
    assert first["draftMemoryBytes"] == expected
    assert first["draftMemory"].endswith("Mi")
    assert all("draftMemoryBytes" not in s for s in rest)

    digest = st["planHash"]
    cm = client.get(ConfigMap, f"draft-{digest}-plan", namespace=namespace)
    plan = json.loads(cm.data["plan.json"])
    assert plan["stages"][0]["draftMemoryBytes"] == expected
    assert json.loads(cm.data["pipeline.json"])["workload"]["speculation"] == "draft"

    pods = {int(p.metadata.labels["llmpipe.io/stage-index"]): p for p in stage_pods(
        client, namespace, "draft", digest
    )}  # fmt: skip
    zero = pods[0].spec
    command = list(zero.containers[0].command)
    at = command.index("--draft-model-dir")
    assert command[at + 1] == "/draft-model"
    assert command[-2:] == ["--model-dir", "/models"]
    volumes = {v.name: v for v in zero.volumes}
    assert volumes["draft-model"].hostPath.path == DRAFT_PATH
    assert volumes["draft-model"].hostPath.type == "Directory"
    mounts = {m.name: m for m in zero.containers[0].volumeMounts}
    assert (mounts["draft-model"].mountPath, mounts["draft-model"].readOnly) == (
        "/draft-model",
        True,
    )
    requests = zero.containers[0].resources.requests
    assert int(requests["memory"]) == plan["stages"][0]["hostMemoryBytes"]
    assert plan["stages"][0]["memoryBytes"] > expected
    for index, pod in pods.items():
        if index == 0:
            continue
        assert "--draft-model-dir" not in pod.spec.containers[0].command
        assert all(v.name != "draft-model" for v in pod.spec.volumes)
    deployments = client.list(
        Deployment, namespace=namespace, labels={"llmpipe.io/pipeline": "draft"}
    )
    assert len(list(deployments)) == len(st["plan"]["stages"])


def test_a_draft_too_large_for_stage_0_is_not_planned_and_named(
    control_plane: cp.ControlPlane,
    operator: OperatorProcess,
    namespace: str,
    pool: Pool,
    client: Client,
) -> None:
    for node in ("edge-a", "edge-b", "edge-c"):
        pool.add(node, tier="edge", memory="400Mi", tflops=1.0, uplink_mbps=300)
    pool.add("cloud-a", tier="cloud", memory="8Gi", tflops=20.0, uplink_mbps=1000)
    # the model's own size: the model fits the chain, but stage 0 (on the edge) cannot
    # hold it as a draft beside its embeddings and a layer
    big = {**MODEL_CONFIG}
    result = apply(control_plane, namespace, drafted("bigdraft", pool.selector, big))
    assert result.returncode == 0, result.stderr
    st = wait_planned_false(client, operator, namespace, "bigdraft")
    planned = condition(st, "Planned")
    assert planned["reason"] == "InsufficientMemory", planned
    assert "for stage 0's draft model (weights + KV cache)" in planned["message"]
    assert "stage 0 holds the draft model" in planned["message"]
    assert st["phase"] == "Failed"
    assert not list(
        client.list(Deployment, namespace=namespace, labels={"llmpipe.io/pipeline": "bigdraft"})
    )


def _no_speculation(m: dict[str, Any]) -> None:
    del m["spec"]["workload"]["speculation"]


def _ngram(m: dict[str, Any]) -> None:
    m["spec"]["workload"]["speculation"] = "ngram"


def _no_draft(m: dict[str, Any]) -> None:
    del m["spec"]["model"]["draft"]


def _other_vocab(m: dict[str, Any]) -> None:
    m["spec"]["model"]["draft"]["config"]["vocab_size"] = 49152


def _two_sources(m: dict[str, Any]) -> None:
    m["spec"]["model"]["draft"]["source"]["pvc"] = {"claimName": "drafts"}


@pytest.mark.parametrize(
    "mutate, message",
    [
        (_no_speculation, "spec.model.draft is set but spec.workload.speculation is not draft"),
        (_ngram, "spec.model.draft is set but spec.workload.speculation is not draft"),
        (_no_draft, "spec.workload.speculation is draft but spec.model.draft is not set"),
        (_other_vocab, "spec.model.draft.config.vocab_size must equal spec.model.config"),
        (_two_sources, "model.draft.source must set exactly one of pvc, hostPath"),
    ],
    ids=["no-speculation", "ngram", "no-draft", "other-vocab", "two-sources"],
)
def test_a_draft_spec_the_operator_cannot_use_is_refused_at_apply(
    control_plane: cp.ControlPlane, crd: object, namespace: str, mutate: Any, message: str
) -> None:
    manifest = drafted("baddraft", {"pool": "none"})
    mutate(manifest)
    result = apply(control_plane, namespace, manifest)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    with pytest.raises(ApiError):
        control_plane.client().get(LLMPipeline, "baddraft", namespace=namespace)
