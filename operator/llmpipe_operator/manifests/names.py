"""Names, labels, owner references and the plan hash shared by every builder. Pure.

Stage objects are named and labelled by the plan hash, so two plans of one pipeline can
exist side by side during a switch: the new plan's stages come up under new names while the
old ones keep serving, and the user-facing Service moves by changing one label in its
selector.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llmpipe_operator import spec as spec_mod

GROUP = "llmpipe.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "LLMPipeline"
PLURAL = "llmpipelines"

LABEL_PIPELINE = "llmpipe.io/pipeline"
LABEL_PLAN_HASH = "llmpipe.io/plan-hash"
LABEL_STAGE_INDEX = "llmpipe.io/stage-index"
LABEL_COMPONENT = "app.kubernetes.io/component"
FIELD_MANAGER = "llmpipe-operator"

GRPC_PORT = 50051
HTTP_PORT = 8000
HASH_LENGTH = 8


@dataclass(frozen=True)
class PipelineRef:
    """Identity of one LLMPipeline: what every child's name and owner reference needs."""

    name: str
    namespace: str
    uid: str


def plan_hash(plan: Mapping[str, Any], spec: spec_mod.PipelineSpec) -> str:
    """Hash of the plan and of everything the stage pods are built from.

    Any change that needs new stage pods (a new partition, image, env, model source, ...)
    gives a new hash, hence new objects and a zero-downtime switch; a change that does not
    (the user-facing Service's port) keeps the hash and the running stages.
    """
    inputs = {
        "plan": plan,
        "model": {
            "name": spec.model.name,
            "dtype": spec.model.dtype,
            "source": repr(spec.model.source),
            # only when set, so a default spec keeps the hash it had before the field
            **(
                {"quantization": spec.model.quantization}
                if spec.model.quantization != "none"
                else {}
            ),
            # stage 0's draft model (its files and flags); only when set, likewise
            **(
                {
                    "draft": {
                        "source": repr(spec.model.draft.source),
                        "config": dict(spec.model.draft.config),
                    }
                }
                if spec.model.draft is not None
                else {}
            ),
        },
        "workload": {
            "maxSequences": spec.workload.max_sequences,
            "maxContextTokens": spec.workload.max_context_tokens,
            # only when set, so the hashes of pipelines without it stay as they were
            **(
                {"prefillChunkTokens": spec.workload.prefill_chunk_tokens}
                if spec.workload.prefill_chunk_tokens is not None
                else {}
            ),
            **(
                {"prefillTokensInFlight": spec.workload.prefill_tokens_in_flight}
                if spec.workload.prefill_tokens_in_flight is not None
                else {}
            ),
            **(
                {"speculation": spec.workload.speculation}
                if spec.workload.speculation is not None
                else {}
            ),
        },
        "tolerations": [t.to_dict() for t in spec.placement.tolerations],
        "runtime": {
            "image": spec.runtime.image,
            "pull": spec.runtime.image_pull_policy,
            "resources": spec.runtime.resources,
            "env": list(spec.runtime.env),
        },
        # Stage 0's flags and volumes (prompt bound, API keys); the keys themselves live
        # in the Secret and rotate without new pods.
        "api": {
            "maxPromptCharacters": spec.service.max_prompt_characters,
            "apiKeySecret": spec.service.auth.api_key_secret,
            "protectMetrics": spec.service.auth.protect_metrics,
        },
    }
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:HASH_LENGTH]


def stage_name(pipeline: PipelineRef, digest: str, index: int) -> str:
    """`<pipeline>-<planhash8>-s<i>`: the stage's Deployment and Service (a DNS-1035 label)."""
    return f"{pipeline.name}-{digest}-s{index}"


def plan_configmap_name(pipeline: PipelineRef, digest: str) -> str:
    return f"{pipeline.name}-{digest}-plan"


def stage_tls_secret_name(pipeline: PipelineRef, digest: str, index: int) -> str:
    """The stage's certificate and key (mounted into its pod only)."""
    return f"{stage_name(pipeline, digest, index)}-tls"


def ca_secret_name(pipeline: PipelineRef) -> str:
    """The pipeline's CA key: read by the operator only, mounted nowhere."""
    return f"{pipeline.name}-llmpipe-ca"


def stage_hosts(pipeline: PipelineRef, digest: str, index: int) -> tuple[str, ...]:
    """The names a neighbour may dial the stage's Service by (its certificate's DNS SANs)."""
    service = stage_name(pipeline, digest, index)
    ns = pipeline.namespace
    return (f"{service}.{ns}.svc", f"{service}.{ns}.svc.cluster.local", f"{service}.{ns}", service)


def endpoint_service_name(pipeline: PipelineRef) -> str:
    """The user-facing Service carries the pipeline's own name: stable across plans."""
    return pipeline.name


def network_policy_name(pipeline: PipelineRef) -> str:
    """One per pipeline, stable across plans (it selects every plan's stage pods)."""
    return f"{pipeline.name}-network"


def stage_address(pipeline: PipelineRef, digest: str, index: int) -> str:
    """gRPC address of a stage's Service, resolvable from any namespace."""
    return f"{stage_name(pipeline, digest, index)}.{pipeline.namespace}.svc:{GRPC_PORT}"


def endpoint_url(pipeline: PipelineRef, port: int) -> str:
    return f"http://{endpoint_service_name(pipeline)}.{pipeline.namespace}.svc:{port}/v1"


def pipeline_labels(pipeline: PipelineRef) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "llmpipe",
        "app.kubernetes.io/instance": pipeline.name,
        "app.kubernetes.io/managed-by": FIELD_MANAGER,
        LABEL_PIPELINE: pipeline.name,
    }


def plan_labels(pipeline: PipelineRef, digest: str) -> dict[str, str]:
    return {**pipeline_labels(pipeline), LABEL_PLAN_HASH: digest}


def stage_selector(pipeline: PipelineRef, digest: str, index: int) -> dict[str, str]:
    """The labels that select exactly one stage's pod (also the endpoint Service's selector)."""
    return {LABEL_PIPELINE: pipeline.name, LABEL_PLAN_HASH: digest, LABEL_STAGE_INDEX: str(index)}


def stage_pods_selector(pipeline: PipelineRef) -> dict[str, str]:
    """The labels every stage pod of the pipeline carries, whatever its plan."""
    return {LABEL_PIPELINE: pipeline.name, LABEL_COMPONENT: "stage"}


def owner_reference(pipeline: PipelineRef) -> dict[str, Any]:
    """Children are garbage-collected with the pipeline; no finalizer is involved.

    blockOwnerDeletion is left unset: it would need update on llmpipelines/finalizers and
    only matters for foreground deletion.
    """
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": pipeline.name,
        "uid": pipeline.uid,
        "controller": True,
    }


def metadata(pipeline: PipelineRef, name: str, labels: Mapping[str, str]) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": pipeline.namespace,
        "labels": dict(labels),
        "ownerReferences": [owner_reference(pipeline)],
    }
