"""Stage 0's draft model (spec.model.draft) in the rendered objects.

Covers: stage 0's pod gets the draft model by each source kind (host directory, claim,
Hugging Face download of the whole model, GGUF conversion) in its own volume at
/draft-model, read-only in the stage container, and `--draft-model-dir` before
`--model-dir`; the other stages get nothing of it; the model's own files are rendered as
without a draft; pipeline.json says `speculation: draft`; stage 0's memory request holds
the draft's term; the plan hash follows the draft model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from llmpipe_operator import spec as spec_mod
from llmpipe_operator.manifests import model_files, names, render, stages
from llmpipe_operator.planning import planner
from tests.unit.manifests.builders import REF, a_plan, a_spec, three_nodes


def drafted_plan(spec: spec_mod.PipelineSpec) -> dict[str, Any]:
    """The real planner's plan for `spec` on `three_nodes()`, stage 0 holding the draft
    model (as the reconcile's workload has it)."""
    workload = planner.with_draft(
        planner.Workload(
            max_sequences=spec.workload.max_sequences,
            max_context_tokens=spec.workload.max_context_tokens,
            runtime_overhead_bytes=spec.runtime.runtime_overhead_bytes,
        ),
        spec.draft_profile(),
    )
    placement = planner.Placement(first_stage="edge", max_stages=3)
    plan = planner.plan_pipeline(
        spec.profile(), three_nodes(), workload=workload, placement=placement
    )
    return plan.to_dict()


def pods(spec: spec_mod.PipelineSpec, plan: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        stages.build_stage_deployment(REF, spec, stage, digest="abcd1234")["spec"]["template"][
            "spec"
        ]
        for stage in plan["stages"]
    ]


def command_of(pod: dict[str, Any]) -> list[str]:
    return list(pod["containers"][0]["command"])


def test_stage_0_mounts_the_draft_model_and_names_it_other_stages_get_nothing() -> None:
    spec = a_spec().draft().build()
    plan = drafted_plan(spec)
    assert len(plan["stages"]) >= 2
    first, *rest = pods(spec, plan)
    command = command_of(first)
    at = command.index("--draft-model-dir")
    assert command[at : at + 2] == ["--draft-model-dir", "/draft-model"]
    assert command[-2:] == ["--model-dir", "/models"]  # the model's directory stays last
    volumes = {v["name"]: v for v in first["volumes"]}
    assert volumes["draft-model"]["hostPath"] == {
        "path": "/var/lib/llmpipe/models/tiny-draft",
        "type": "Directory",
    }
    mounts = {m["name"]: m for m in first["containers"][0]["volumeMounts"]}
    assert mounts["draft-model"] == {
        "name": "draft-model",
        "mountPath": "/draft-model",
        "readOnly": True,
    }
    assert "initContainers" not in first
    for pod in rest:
        assert "--draft-model-dir" not in command_of(pod)
        assert all(v["name"] != "draft-model" for v in pod["volumes"])
        assert all(m["name"] != "draft-model" for m in pod["containers"][0]["volumeMounts"])


def test_without_a_draft_model_stage_0_is_rendered_as_before() -> None:
    plain = a_spec().build()
    plan = a_plan(plain)
    (first, *_) = pods(plain, plan)
    assert "--draft-model-dir" not in command_of(first)
    names_ = [v["name"] for v in first["volumes"]]
    assert names_ == ["plan", "model", "tmp", "tls"]


def test_the_models_own_volumes_keep_their_order_beside_the_draft() -> None:
    spec = a_spec().draft(pvc={"claimName": "drafts", "path": "smol"}).build()
    (first, *_) = pods(spec, drafted_plan(spec))
    assert [v["name"] for v in first["volumes"]] == ["plan", "model", "tmp", "draft-model", "tls"]
    assert first["volumes"][3]["persistentVolumeClaim"] == {"claimName": "drafts", "readOnly": True}
    command = command_of(first)
    assert command[command.index("--draft-model-dir") + 1] == "/draft-model/smol"


def test_a_hugging_face_draft_is_downloaded_whole_into_its_own_volume() -> None:
    spec = a_spec().hugging_face("org/tiny", secret="hf").draft(huggingFace={"id": "org/small"})
    built = spec.build()
    plan = drafted_plan(built)
    first, second, *_ = pods(built, plan)
    init = first["initContainers"]
    assert [c["name"] for c in init] == ["fetch-model", "fetch-draft-model"]
    fetch = init[1]
    assert fetch["command"] == [
        "python", "-m", "llmpipe_stage.fetch", "org/small", "main", "/draft-model/model",
        "--layer-start", "0", "--layer-end", "2", "--embedding", "--head",
    ]  # fmt: skip
    assert fetch["volumeMounts"][0] == {"name": "draft-model", "mountPath": "/draft-model"}
    assert all(e["name"] != "HF_TOKEN" for e in fetch["env"])  # the draft names no secret
    volumes = {v["name"]: v for v in first["volumes"]}
    draft = model_files.draft_files(built)
    assert draft is not None
    limit = str(model_files.download_size_limit(draft))
    assert volumes["draft-model"]["emptyDir"] == {"sizeLimit": limit}
    assert volumes["model"]["emptyDir"]["sizeLimit"] != limit  # each sized by its own model
    # the model's own download is the stage's slice, as without a draft
    assert init[0]["command"][5] == "/models/model"
    assert [c["name"] for c in second["initContainers"]] == ["fetch-model"]


@pytest.mark.parametrize(
    "location, file_in_pod",
    [
        ({"hostPath": "/var/lib/llmpipe/models/small.Q8_0.gguf"}, "/draft-gguf/small.Q8_0.gguf"),
        ({"pvc": {"claimName": "drafts", "path": "q/small.gguf"}}, "/draft-gguf/q/small.gguf"),
        (
            {"huggingFace": {"id": "org/small-GGUF", "filename": "small.Q8_0.gguf"}},
            "/draft-model/gguf/small.Q8_0.gguf",
        ),
    ],
    ids=["hostPath", "pvc", "huggingFace"],
)
def test_a_gguf_draft_is_converted_at_stage_0s_dtype(location: dict, file_in_pod: str) -> None:
    spec = a_spec().draft(gguf=location).build()
    plan = drafted_plan(spec)
    (first, *rest) = pods(spec, plan)
    init = first["initContainers"]
    convert = init[-1]
    assert convert["name"] == "convert-draft-gguf"
    dtype = plan["stages"][0]["dtype"]
    assert convert["command"] == [
        "python", "-m", "llmpipe_stage.gguf_convert", file_in_pod,
        "--out", "/draft-model/model", "--dtype", dtype,
    ]  # fmt: skip
    volumes = {v["name"]: v for v in first["volumes"]}
    mounts = {m["name"]: m for m in convert["volumeMounts"]}
    assert mounts["draft-model"]["mountPath"] == "/draft-model"
    if "huggingFace" in location:
        assert [c["name"] for c in init] == ["fetch-draft-gguf", "convert-draft-gguf"]
        assert init[0]["command"][3:] == [
            "org/small-GGUF", "main", "small.Q8_0.gguf", "/draft-model/gguf",
        ]  # fmt: skip
        assert "draft-gguf" not in volumes
    else:
        assert [c["name"] for c in init] == ["convert-draft-gguf"]
        assert mounts["draft-gguf"]["readOnly"] is True
    command = command_of(first)
    assert command[command.index("--draft-model-dir") + 1] == "/draft-model/model"
    for pod in rest:
        assert "initContainers" not in pod


def test_pipeline_json_stage_0s_memory_and_the_plan_hash_follow_the_draft() -> None:
    spec = a_spec().draft().build()
    plan = drafted_plan(spec)
    digest = names.plan_hash(plan, spec)
    objects = render.render_plan(REF, spec, plan, digest=digest)
    (configmap,) = [o for o in objects if o["kind"] == "ConfigMap"]
    pipeline = json.loads(configmap["data"]["pipeline.json"])
    assert pipeline["workload"]["speculation"] == "draft"
    first = plan["stages"][0]
    draft_profile = spec.draft_profile()
    assert draft_profile is not None
    draft_kv = 4 * 2048 * draft_profile.kv_bytes_per_token_per_layer * draft_profile.num_layers
    assert first["draftMemoryBytes"] == draft_profile.total_weight_bytes + draft_kv
    deployments = [o for o in objects if o["kind"] == "Deployment"]
    container = deployments[0]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["requests"]["memory"] == str(first["memoryBytes"])
    assert all("draftMemoryBytes" not in s for s in plan["stages"][1:])
    other = a_spec().draft(hostPath={"path": "/var/lib/llmpipe/models/other"}).build()
    assert names.plan_hash(plan, other) != digest
    assert names.plan_hash(plan, a_spec().draft().build()) == digest


def test_the_stage_reads_what_stage_0_is_rendered_with(tmp_path: Path) -> None:
    """The contract with the stage: its own parsers read the rendered command line and
    ConfigMap (plan.json's draftMemoryBytes included) as the drafter needs them."""
    from llmpipe_stage import __main__ as stage_main
    from llmpipe_stage import config as stage_config

    spec = a_spec().draft(pvc={"claimName": "drafts", "path": "smol"}).build()
    plan = drafted_plan(spec)
    digest = names.plan_hash(plan, spec)
    objects = render.render_plan(REF, spec, plan, digest=digest)
    (configmap,) = [o for o in objects if o["kind"] == "ConfigMap"]
    for key, text in configmap["data"].items():
        (tmp_path / key).write_text(text)
    pipeline = stage_config.read_config_dir(tmp_path)
    assert pipeline.speculation == "draft"
    (first, *_) = pods(spec, plan)
    command = command_of(first)
    assert command[:3] == ["python", "-m", "llmpipe_stage"]
    args = stage_main.parse_args(command[3:])
    assert args.draft_model_dir == Path("/draft-model/smol")
    assert args.model_dir == Path("/models")
    assert args.stage_index == 0
