"""Builder for the plan ConfigMap the stages mount at /etc/llmpipe. Pure.

Keys (the stage container contract): `plan.json` is exactly the plan JSON of docs/design.md;
`pipeline.json` names the model, the workload and every stage's gRPC address.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from llmpipe_common import pipeline_config
from llmpipe_operator import spec as spec_mod
from llmpipe_operator.manifests import names


def build_pipeline_config(
    pipeline: names.PipelineRef,
    spec: spec_mod.PipelineSpec,
    plan: Mapping[str, Any],
    *,
    digest: str,
) -> dict[str, Any]:
    """The `pipeline.json` document: what a stage needs beyond its own layers."""
    return pipeline_config.pipeline_document(
        # A concrete dtype (auto's planned one): each plan stage names its own, and a stage
        # reading a plan without them (older plans) runs this one.
        model_name=spec.model.name,
        dtype=spec.model.planned_dtype,
        max_sequences=spec.workload.max_sequences,
        max_context_tokens=spec.workload.max_context_tokens,
        prefill_chunk_tokens=prefill_chunk_tokens(spec, plan),
        speculation=spec.workload.speculation,
        prefill_tokens_in_flight=spec.workload.prefill_tokens_in_flight,
        # written only when set: a default spec's pipeline.json stays as it was
        quantization=None if spec.model.quantization == "none" else spec.model.quantization,
        addresses=[
            (int(stage["index"]), names.stage_address(pipeline, digest, int(stage["index"])))
            for stage in plan["stages"]
        ],
    )


def prefill_chunk_tokens(spec: spec_mod.PipelineSpec, plan: Mapping[str, Any]) -> int:
    """spec.workload.prefillChunkTokens when set, else the chunk the planner chose (a plan
    from before chunking has none: 0, off)."""
    if spec.workload.prefill_chunk_tokens is not None:
        return spec.workload.prefill_chunk_tokens
    return int(plan.get("prefillChunkTokens", 0))


def build_plan_configmap(
    pipeline: names.PipelineRef,
    spec: spec_mod.PipelineSpec,
    plan: Mapping[str, Any],
    *,
    digest: str,
) -> dict[str, Any]:
    config = build_pipeline_config(pipeline, spec, plan, digest=digest)
    labels = {**names.plan_labels(pipeline, digest), names.LABEL_COMPONENT: "plan"}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": names.metadata(pipeline, names.plan_configmap_name(pipeline, digest), labels),
        # Immutable: a plan never changes under its hash; a new plan is a new ConfigMap.
        "immutable": True,
        "data": {
            "plan.json": json.dumps(plan, indent=2, sort_keys=True) + "\n",
            "pipeline.json": json.dumps(config, indent=2, sort_keys=True) + "\n",
        },
    }
