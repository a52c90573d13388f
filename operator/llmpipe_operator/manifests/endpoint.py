"""Builder for the user-facing Service (the OpenAI-compatible API of stage 0). Pure.

Its selector names one plan hash: moving it from the old plan's stage 0 to the new one's
is the switch, done only once the new plan is fully available.
"""

from __future__ import annotations

from typing import Any

from llmpipe_operator import spec as spec_mod
from llmpipe_operator.manifests import names


def build_endpoint_service(
    pipeline: names.PipelineRef, spec: spec_mod.PipelineSpec, *, serving_digest: str
) -> dict[str, Any]:
    labels = {**names.pipeline_labels(pipeline), names.LABEL_COMPONENT: "endpoint"}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": names.metadata(pipeline, names.endpoint_service_name(pipeline), labels),
        "spec": {
            "type": spec.service.type,
            "selector": names.stage_selector(pipeline, serving_digest, 0),
            "ports": [
                {"name": "http", "port": spec.service.port, "targetPort": "http", "protocol": "TCP"}
            ],
        },
    }


def serving_digest(service: dict[str, Any] | None) -> str | None:
    """Which plan an existing endpoint Service routes to (None: no Service yet)."""
    if not service:
        return None
    selector = (service.get("spec") or {}).get("selector") or {}
    digest = selector.get(names.LABEL_PLAN_HASH)
    return str(digest) if digest else None
