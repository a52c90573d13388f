"""Everything one plan needs, in apply order: plan ConfigMap, stage Services, Deployments."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmpipe_operator import spec as spec_mod
from llmpipe_operator.manifests import names, plan_config, stages


def render_plan(
    pipeline: names.PipelineRef,
    spec: spec_mod.PipelineSpec,
    plan: Mapping[str, Any],
    *,
    digest: str,
) -> list[dict[str, Any]]:
    """The ConfigMap comes first so no stage pod waits on a missing volume."""
    objects = [plan_config.build_plan_configmap(pipeline, spec, plan, digest=digest)]
    objects += [
        stages.build_stage_service(pipeline, stage, digest=digest) for stage in plan["stages"]
    ]
    objects += [
        stages.build_stage_deployment(pipeline, spec, stage, digest=digest)
        for stage in plan["stages"]
    ]
    return objects
