"""Fluent builders for LLMPipeline specs, nodes and plans used by the operator unit tests."""

from __future__ import annotations

import copy
from typing import Any

from llmpipe_operator import policy
from llmpipe_operator import spec as spec_mod
from llmpipe_operator.manifests import names
from llmpipe_operator.planning import inventory, planner
from tests.support.models import TINY_DRAFT_CONFIG, TINY_LLAMA_CONFIG

REF = names.PipelineRef(name="chat", namespace="team-a", uid="0000-uid")


class SpecBuilder:
    """`a_spec().pvc("models", "tiny").max_stages(2).build()`"""

    def __init__(self) -> None:
        self.raw: dict[str, Any] = {
            "model": {
                "name": "tiny-llama",
                "source": {"hostPath": {"path": "/var/lib/llmpipe/models/tiny"}},
                "config": copy.deepcopy(TINY_LLAMA_CONFIG),
            }
        }

    def source(self, **source: Any) -> SpecBuilder:
        self.raw["model"]["source"] = source
        return self

    def pvc(self, claim: str, path: str = "") -> SpecBuilder:
        return self.source(pvc={"claimName": claim, "path": path})

    def hugging_face(self, repo: str, secret: str | None = None) -> SpecBuilder:
        body: dict[str, Any] = {"id": repo, "revision": "abc123"}
        if secret:
            body["tokenSecret"] = {"name": secret}
        return self.source(huggingFace=body)

    def gguf(self, **location: Any) -> SpecBuilder:
        """gguf(hostPath="/m/x.gguf") | gguf(pvc={...}) | gguf(huggingFace={...})"""
        return self.source(gguf=location)

    def draft(self, **source: Any) -> SpecBuilder:
        """spec.model.draft from `source` (default a host path) with TINY_DRAFT_CONFIG, and
        `speculation: draft` that goes with it."""
        source = source or {"hostPath": {"path": "/var/lib/llmpipe/models/tiny-draft"}}
        self.raw["model"]["draft"] = {"source": source, "config": copy.deepcopy(TINY_DRAFT_CONFIG)}
        return self.workload(speculation="draft")

    def placement(self, **fields: Any) -> SpecBuilder:
        self.raw.setdefault("placement", {}).update(fields)
        return self

    def workload(self, **fields: Any) -> SpecBuilder:
        self.raw.setdefault("workload", {}).update(fields)
        return self

    def runtime(self, **fields: Any) -> SpecBuilder:
        self.raw.setdefault("runtime", {}).update(fields)
        return self

    def service(self, **fields: Any) -> SpecBuilder:
        self.raw.setdefault("service", {}).update(fields)
        return self

    def parsed(self) -> spec_mod.PipelineSpec:
        """The spec as the parser reads it, runtime not yet completed from a profile."""
        return spec_mod.parse_spec(self.raw)

    def build(self) -> spec_mod.PipelineSpec:
        """The spec as the operator renders it: resolved under a policy allowing any image
        and host path (the policy's own rules are tested in tests/unit/policy/)."""
        return policy.resolve(self.parsed(), ANY_IMAGE_POLICY)


ANY_IMAGE_POLICY = policy.Policy(
    profiles=policy.default_policy().profiles,
    default_profile="default",
    allowed_images=("*", "*/*", "*/*/*"),
    allowed_host_paths=("",),
)


def a_spec() -> SpecBuilder:
    return SpecBuilder()


def three_nodes() -> inventory.Inventory:
    """Three small nodes: the tiny model spreads over all of them when maxStages allows."""
    return inventory.parse_cluster(
        {
            "nodes": [
                {
                    "name": "edge-a",
                    "tier": "edge",
                    "memory": "700Mi",
                    "tflops": 1.0,
                    "memoryBandwidthGBps": 50,
                    "uplinkMbps": 1000,
                },
                {
                    "name": "edge-b",
                    "tier": "edge",
                    "memory": "700Mi",
                    "tflops": 1.0,
                    "memoryBandwidthGBps": 50,
                    "uplinkMbps": 1000,
                },
                {
                    "name": "cloud-a",
                    "tier": "cloud",
                    "memory": "8Gi",
                    "tflops": 20.0,
                    "memoryBandwidthGBps": 400,
                    "uplinkMbps": 10000,
                },
            ]
        }
    )


def a_plan(
    spec: spec_mod.PipelineSpec, *, max_stages: int | None = 3, first_stage: str = "edge"
) -> dict[str, Any]:
    """A real plan from the real planner for `spec` on `three_nodes()`."""
    workload = planner.Workload(
        objective=spec.workload.objective,
        max_sequences=spec.workload.max_sequences,
        max_context_tokens=spec.workload.max_context_tokens,
        runtime_overhead_bytes=spec.runtime.runtime_overhead_bytes,
    )
    placement = planner.Placement(first_stage=first_stage, max_stages=max_stages)  # type: ignore[arg-type]
    return planner.plan_pipeline(
        spec.profile(), three_nodes(), workload=workload, placement=placement
    ).to_dict()
