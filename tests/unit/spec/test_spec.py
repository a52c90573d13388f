"""Spec parsing: the dataclasses mirror the CRD schema, defaults included, and a spec the
operator cannot act on is refused with a message naming the field.

Covers: every schema default equals the parser's default (one source of truth, checked);
exactly one model source; path rules; numeric bounds; tolerations matching like
Kubernetes; an unusable config.json; spec.replan.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmpipe_operator import spec as spec_mod
from tests.support.models import TINY_LLAMA_CONFIG
from tests.unit.manifests.builders import a_spec

CRD = Path(__file__).resolve().parents[3] / "crds" / "llmpipeline.yaml"


def schema_defaults(schema: dict[str, Any], path: tuple[str, ...] = ()) -> dict[tuple, Any]:
    """Every `default` in the schema, by field path."""
    found = {}
    if "default" in schema and schema["default"] != {}:
        found[path] = schema["default"]
    for key, sub in (schema.get("properties") or {}).items():
        found.update(schema_defaults(sub, (*path, key)))
    return found


def crd_spec_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = crd["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]["properties"]["spec"]


PARSED = {
    ("model", "dtype"): lambda s: s.model.dtype,
    ("model", "quantization"): lambda s: s.model.quantization,
    ("placement", "firstStage"): lambda s: s.placement.first_stage,
    ("placement", "lastStage"): lambda s: s.placement.last_stage,
    ("workload", "objective"): lambda s: s.workload.objective,
    ("workload", "maxSequences"): lambda s: s.workload.max_sequences,
    ("workload", "maxContextTokens"): lambda s: s.workload.max_context_tokens,
    ("runtime", "runtimeOverhead"): lambda s: s.runtime.runtime_overhead_bytes,
    ("runtime", "device"): lambda s: s.runtime.device,
    ("service", "port"): lambda s: s.service.port,
    ("service", "type"): lambda s: s.service.type,
    ("service", "maxPromptCharacters"): lambda s: s.service.max_prompt_characters,
    ("service", "auth", "protectMetrics"): lambda s: s.service.auth.protect_metrics,
    ("replan", "improvementMargin"): lambda s: s.replan.improvement_margin,
    ("replan", "debounceSeconds"): lambda s: s.replan.debounce_seconds,
    ("replan", "switchTimeoutSeconds"): lambda s: s.replan.switch_timeout_seconds,
    ("replan", "drainSeconds"): lambda s: s.replan.drain_seconds,
}


def test_parser_defaults_are_the_crd_defaults() -> None:
    defaults = schema_defaults(crd_spec_schema())
    spec = a_spec().parsed()
    source_defaults = {k for k in defaults if k[:2] in {("model", "source"), ("model", "draft")}}
    assert set(defaults) - source_defaults == set(PARSED)
    for path, read in PARSED.items():
        expected = defaults[path]
        if path == ("runtime", "runtimeOverhead"):
            expected = 512 * 1024**2 if expected == "512Mi" else expected
        assert read(spec) == expected, path


def test_gguf_source_is_parsed() -> None:
    hub = {"id": "org/m-GGUF", "filename": "m.Q4_K_M.gguf", "tokenSecret": {"name": "hf"}}
    spec = a_spec().gguf(huggingFace=hub).build()
    assert spec.model.source == spec_mod.GgufSource(
        hf_id="org/m-GGUF", filename="m.Q4_K_M.gguf", token_secret_name="hf"
    )
    assert spec.model.source.location == "huggingFace"
    spec = a_spec().gguf(hostPath="/srv/m.gguf").build()
    assert spec.model.source == spec_mod.GgufSource(host_path="/srv/m.gguf")
    spec = a_spec().gguf(pvc={"claimName": "c", "path": "d/m.gguf"}).build()
    assert spec.model.source == spec_mod.GgufSource(claim_name="c", path="d/m.gguf")


def test_parsed_spec_carries_every_field() -> None:
    spec = (
        a_spec()
        .pvc("models", "tiny")
        .placement(
            nodeSelector={"pool": "llm"},
            maxStages=3,
            excludeNodes=["x"],
            firstStage="edge",
            lastStage="edge",
            tolerations=[{"key": "k", "operator": "Equal", "value": "v", "effect": "NoSchedule"}],
        )
        .workload(objective="latency", maxSequences=2, maxContextTokens=4096)
        .runtime(
            profile="gpu",
            image="img:1",
            imagePullPolicy="Always",
            runtimeOverhead="1Gi",
            env=[{"name": "A", "value": "1"}],
        )
        .service(port=80, type="LoadBalancer", allowFrom=[{"namespaceSelector": {}}])
        .parsed()
    )
    assert spec.model.source == spec_mod.PvcSource(claim_name="models", path="tiny")
    assert spec.placement.node_selector == {"pool": "llm"}
    assert spec.placement.max_stages == 3
    assert spec.placement.exclude_nodes == frozenset({"x"})
    assert (spec.placement.first_stage, spec.placement.last_stage) == ("edge", "edge")
    assert spec.workload == spec_mod.WorkloadSpec("latency", 2, 4096)
    assert spec.runtime.runtime_overhead_bytes == 1024**3
    assert spec.runtime.env == ({"name": "A", "value": "1"},)
    assert (spec.runtime.profile, spec.runtime.image) == ("gpu", "img:1")
    assert spec.runtime.image_pull_policy == "Always"
    assert (spec.service.port, spec.service.type) == (80, "LoadBalancer")
    assert spec.service.allow_from == ({"namespaceSelector": {}},)
    assert spec.profile().num_layers == 8


refused = pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b.source(), "exactly one of pvc, hostPath, huggingFace or gguf"),
        (lambda b: b.source(pvc={"claimName": "m"}, hostPath={"path": "/m"}), "exactly one of"),
        (lambda b: b.pvc("m", "../etc"), "spec.model.source.pvc.path"),
        (lambda b: b.source(hostPath={"path": "relative"}), "must be absolute"),
        (lambda b: b.placement(maxStages=0), "spec.placement.maxStages must be an integer >= 1"),
        (lambda b: b.workload(maxContextTokens=0), "spec.workload.maxContextTokens"),
        (lambda b: b.workload(objective="speed"), "spec.workload.objective must be one of"),
        (lambda b: b.runtime(runtimeOverhead="lots"), "spec.runtime.runtimeOverhead"),
        (lambda b: b.service(port=70000), "spec.service.port"),
        (lambda b: b.placement(tolerations=[{"value": "x"}]), "without a key must use"),
        (lambda b: b.raw["model"].pop("config"), "spec.model.config is required"),
        (lambda b: b.raw["model"]["config"].update(model_type="mamba"), "spec.model.config"),
        (lambda b: b.raw.update(replan={"improvementMargin": 2}), "improvementMargin"),
        (lambda b: b.gguf(), "gguf must set exactly one of hostPath, pvc or huggingFace"),
        (lambda b: b.gguf(hostPath="/m/model.bin"), "absolute path to a .gguf file"),
        (lambda b: b.gguf(pvc={"claimName": "m", "path": "../x.gguf"}), "without '..'"),
        (lambda b: b.gguf(huggingFace={"id": "a/b"}), "gguf.huggingFace.filename is required"),
        (lambda b: b.service(allowFrom=[{"pods": {}}]), "spec.service.allowFrom[0] must set"),
        (
            lambda b: b.service(allowFrom=[{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]),
            "spec.service.allowFrom[0].ipBlock needs a cidr and stands alone",
        ),
        (lambda b: b.runtime(imagePullPolicy="Sometimes"), "spec.runtime.imagePullPolicy"),
    ],
    ids=[
        "no-source",
        "two-sources",
        "dotdot",
        "relative-hostpath",
        "max-stages-0",
        "context-0",
        "objective",
        "overhead",
        "port",
        "toleration",
        "no-config",
        "unsupported-model",
        "margin",
        "gguf-no-location",
        "gguf-not-gguf",
        "gguf-dotdot",
        "gguf-no-filename",
        "peer-kind",
        "peer-ipblock",
        "pull-policy",
    ],
)


@refused
def test_unusable_spec_is_refused_naming_the_field(mutate, message) -> None:
    builder = a_spec()
    mutate(builder)
    with pytest.raises(
        spec_mod.SpecError,
        match=re.escape(message),
    ):
        builder.parsed()


tolerations = pytest.mark.parametrize(
    "toleration, taint, tolerated",
    [
        (spec_mod.Toleration("gpu", "Exists"), {"key": "gpu", "effect": "NoSchedule"}, True),
        (
            spec_mod.Toleration("gpu", "Equal", "yes"),
            {"key": "gpu", "value": "yes", "effect": "NoSchedule"},
            True,
        ),
        (
            spec_mod.Toleration("gpu", "Equal", "yes"),
            {"key": "gpu", "value": "no", "effect": "NoSchedule"},
            False,
        ),
        (
            spec_mod.Toleration("gpu", "Exists", effect="NoExecute"),
            {"key": "gpu", "effect": "NoSchedule"},
            False,
        ),
        (spec_mod.Toleration(None, "Exists"), {"key": "any", "effect": "NoExecute"}, True),
        (spec_mod.Toleration("edge", "Exists"), {"key": "gpu", "effect": "NoSchedule"}, False),
    ],
)


@tolerations
def test_tolerations_match_taints_like_kubernetes(toleration, taint, tolerated) -> None:
    assert toleration.tolerates(taint) is tolerated


def test_service_auth_and_prompt_bound() -> None:
    spec = a_spec().service(auth={"apiKeySecret": "keys", "protectMetrics": True}).build()
    assert spec.service.auth == spec_mod.AuthSpec(api_key_secret="keys", protect_metrics=True)
    assert a_spec().build().service.auth == spec_mod.AuthSpec(None, False)  # open by default
    for service, says in (
        ({"auth": {"protectMetrics": "yes"}}, "spec.service.auth.protectMetrics"),
        ({"auth": {"apiKeySecret": 7}}, "spec.service.auth.apiKeySecret"),
        ({"auth": "keys"}, "spec.service.auth must be an object"),
        ({"maxPromptCharacters": 0}, "spec.service.maxPromptCharacters"),
    ):
        with pytest.raises(spec_mod.SpecError, match=says):
            a_spec().service(**service).build()


def test_a_config_beyond_the_bounds_is_an_invalid_spec_at_once() -> None:
    raw = {
        "model": {
            "name": "deep",
            "source": {"hostPath": {"path": "/m"}},
            "config": {**TINY_LLAMA_CONFIG, "num_hidden_layers": 100_000},
        }
    }
    with pytest.raises(
        spec_mod.SpecError, match=r"spec\.model\.config: .*num_hidden_layers is 100000"
    ):
        spec_mod.parse_spec(raw)


label_refusals = pytest.mark.parametrize(
    "selector",
    [{"zone": "x" * 100 * 1024}, {"zone": "-bad"}, {"zone": "a b"}, {"bad key!": "x"}],
)


@label_refusals
def test_node_selector_entries_must_be_label_keys_and_values(selector: dict[str, str]) -> None:
    body = {
        "model": {
            "name": "m",
            "source": {"hostPath": {"path": "/m"}},
            "config": dict(TINY_LLAMA_CONFIG),
        },
        "placement": {"nodeSelector": selector},
    }
    with pytest.raises(
        spec_mod.SpecError, match="is not a Kubernetes label key and value"
    ) as raised:
        spec_mod.parse_spec(body)
    assert len(str(raised.value)) < 300


def test_int8_quantization_is_planned_at_its_byte_size_and_reaches_the_stages() -> None:
    from llmpipe_operator.manifests import names, plan_config

    plain = a_spec().parsed()
    builder = a_spec()
    builder.raw["model"]["quantization"] = "int8"
    int8 = builder.parsed()
    assert int8.model.quantization == "int8"
    # bfloat16 -> int8 projections: about half the layer bytes (norms and scales stay 2 B)
    ratio = sum(int8.profile().layer_bytes) / sum(plain.profile().layer_bytes)
    assert 0.5 < ratio < 0.56, ratio
    assert int8.profile().embed_bytes == plain.profile().embed_bytes  # embeddings stay bf16
    ref = names.PipelineRef("default", "p", "uid")
    plan = {"stages": [{"index": 0}]}
    assert (
        plan_config.build_pipeline_config(ref, int8, plan, digest="d")["model"]["quantization"]
        == "int8"
    )
    assert (
        "quantization"
        not in plan_config.build_pipeline_config(ref, plain, plan, digest="d")["model"]
    )
    assert names.plan_hash(plan, int8) != names.plan_hash(plan, plain)


def test_unknown_quantization_is_refused() -> None:
    builder = a_spec()
    builder.raw["model"]["quantization"] = "int4"
    with pytest.raises(spec_mod.SpecError, match="quantization"):
        builder.parsed()


def test_draft_model_is_parsed_with_its_own_mount() -> None:
    spec = a_spec().draft(pvc={"claimName": "drafts", "path": "small"}).parsed()
    assert spec.workload.speculation == "draft"
    assert spec.model.draft == spec_mod.DraftSpec(
        source=spec_mod.PvcSource(claim_name="drafts", path="small"),
        config=spec.model.draft.config,
    )
    assert spec.model.draft.model_dir == "/draft-model/small"
    assert spec.model.model_dir == "/models"  # the model's own mount, apart
    hub = a_spec().draft(huggingFace={"id": "org/small"}).parsed()
    assert hub.model.draft is not None and hub.model.draft.model_dir == "/draft-model/model"
    assert a_spec().parsed().model.draft is None


def test_draft_profile_is_at_the_models_planned_dtype_unquantized() -> None:
    spec = a_spec().draft().raw
    spec["model"]["dtype"] = "float32"
    spec["model"]["quantization"] = "int8"
    parsed = spec_mod.parse_spec(spec)
    profile = parsed.draft_profile()
    assert profile is not None
    assert profile.weight_bytes_per_param == 4  # float32, not int8: stage 0 loads it so
    assert profile.num_layers == 2


def _no_speculation(b: Any) -> None:
    b.draft()
    del b.raw["workload"]["speculation"]


def _other_vocab(b: Any) -> None:
    b.draft()
    b.raw["model"]["draft"]["config"]["vocab_size"] = 49152


@pytest.mark.parametrize(
    "mutate, message",
    [
        (_no_speculation, "spec.model.draft is set but spec.workload.speculation is unset"),
        (
            lambda b: b.draft().workload(speculation="ngram"),
            "spec.model.draft is set but spec.workload.speculation is ngram",
        ),
        (
            lambda b: b.workload(speculation="draft"),
            "spec.workload.speculation is draft but spec.model.draft is not set",
        ),
        (_other_vocab, "spec.model.draft.config.vocab_size is 49152 but spec.model.config"),
        (lambda b: b.draft(hostPath={"path": "rel"}), "spec.model.draft.source.hostPath.path"),
        (lambda b: b.draft(pvc={"claimName": "x"}, hostPath={"path": "/a"}), "draft.source must"),
        (
            lambda b: b.draft().raw["model"]["draft"].pop("config"),
            "spec.model.draft.config is required",
        ),
        (
            lambda b: b.draft().raw["model"]["draft"]["config"].update(model_type="mamba"),
            "spec.model.draft.config:",
        ),
    ],
    ids=[
        "no-speculation",
        "ngram",
        "no-draft",
        "vocab",
        "relative",
        "two-sources",
        "no-config",
        "bad-config",
    ],
)
def test_a_draft_model_spec_the_operator_cannot_use_names_the_field(mutate, message) -> None:
    builder = a_spec()
    mutate(builder)
    with pytest.raises(spec_mod.SpecError, match=re.escape(message)):
        builder.parsed()
