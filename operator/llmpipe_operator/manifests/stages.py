"""Builders for one stage: its Deployment (pinned to the planned node) and its gRPC Service.

Pure: (pipeline, spec, plan stage, plan hash) -> plain dicts; `k8s` applies them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmpipe_operator import spec as spec_mod
from llmpipe_operator.manifests import names

CONFIG_DIR = "/etc/llmpipe"
RUN_AS_USER = 10001
HF_DOWNLOAD = (
    "import os, sys\n"
    "from huggingface_hub import snapshot_download\n"
    "snapshot_download(repo_id=sys.argv[1], revision=sys.argv[2], local_dir=sys.argv[3],\n"
    "                  token=os.environ.get('HF_TOKEN') or None)\n"
)


def build_stage_deployment(
    pipeline: names.PipelineRef,
    spec: spec_mod.PipelineSpec,
    stage: Mapping[str, Any],
    *,
    digest: str,
) -> dict[str, Any]:
    """One replica pinned to the planned node; Recreate so two copies never share its memory."""
    index = int(stage["index"])
    selector = names.stage_selector(pipeline, digest, index)
    labels = {**names.plan_labels(pipeline, digest), **selector, names.LABEL_COMPONENT: "stage"}
    pod_spec: dict[str, Any] = {
        "affinity": _pin_to_node(str(stage["node"])),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_stage_container(spec, index)],
        "volumes": _volumes(pipeline, spec, digest),
    }
    if spec.placement.tolerations:
        pod_spec["tolerations"] = [t.to_dict() for t in spec.placement.tolerations]
    if isinstance(spec.model.source, spec_mod.HuggingFaceSource):
        pod_spec["initContainers"] = [_download_container(spec, spec.model.source)]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": names.metadata(pipeline, names.stage_name(pipeline, digest, index), labels),
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": selector},
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


def build_stage_service(
    pipeline: names.PipelineRef, stage: Mapping[str, Any], *, digest: str
) -> dict[str, Any]:
    """The address the previous stage sends hidden states to (plus its metrics port)."""
    index = int(stage["index"])
    selector = names.stage_selector(pipeline, digest, index)
    labels = {**names.plan_labels(pipeline, digest), **selector, names.LABEL_COMPONENT: "stage"}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": names.metadata(pipeline, names.stage_name(pipeline, digest, index), labels),
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [
                {
                    "name": "grpc",
                    "port": names.GRPC_PORT,
                    "targetPort": "grpc",
                    "protocol": "TCP",
                    "appProtocol": "grpc",
                },
                {"name": "http", "port": names.HTTP_PORT, "targetPort": "http", "protocol": "TCP"},
            ],
        },
    }


def _pin_to_node(node: str) -> dict[str, Any]:
    term = {
        "matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]
    }
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}
        }
    }


def _stage_container(spec: spec_mod.PipelineSpec, index: int) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "stage",
        "image": spec.runtime.image,
        "imagePullPolicy": spec.runtime.image_pull_policy,
        "command": [
            "python",
            "-m",
            "llmpipe_stage",
            "--config-dir",
            CONFIG_DIR,
            "--stage-index",
            str(index),
            "--model-dir",
            spec.model.model_dir,
        ],
        "env": [
            {"name": "LLMPIPE_STAGE_INDEX", "value": str(index)},
            {"name": "HOME", "value": "/tmp"},
            *(dict(item) for item in spec.runtime.env),
        ],
        "ports": [
            {"name": "grpc", "containerPort": names.GRPC_PORT, "protocol": "TCP"},
            {"name": "http", "containerPort": names.HTTP_PORT, "protocol": "TCP"},
        ],
        # Loading weights takes a while: the startup probe holds liveness off until the
        # process answers at all; readiness waits for the weights.
        "startupProbe": _http_probe("/healthz", period=5, failures=120),
        "livenessProbe": _http_probe("/healthz", period=10, failures=3),
        "readinessProbe": _http_probe("/readyz", period=5, failures=3),
        "securityContext": _restricted(),
        "volumeMounts": [
            {"name": "plan", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "model", "mountPath": spec_mod.MODELS_MOUNT, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    if spec.runtime.resources:
        container["resources"] = dict(spec.runtime.resources)
    return container


def _download_container(
    spec: spec_mod.PipelineSpec, source: spec_mod.HuggingFaceSource
) -> dict[str, Any]:
    """Fetches the model into the pod's emptyDir; only this container sees the token."""
    env: list[dict[str, Any]] = [
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": "/tmp/hf"},
    ]
    if source.token_secret_name:
        env.append(
            {
                "name": "HF_TOKEN",
                "valueFrom": {
                    "secretKeyRef": {
                        "name": source.token_secret_name,
                        "key": source.token_secret_key,
                    }
                },
            }
        )
    return {
        "name": "fetch-model",
        "image": spec.runtime.image,
        "imagePullPolicy": spec.runtime.image_pull_policy,
        "command": ["python", "-c", HF_DOWNLOAD, source.id, source.revision, spec.model.model_dir],
        "env": env,
        "securityContext": _restricted(),
        "volumeMounts": [
            {"name": "model", "mountPath": spec_mod.MODELS_MOUNT},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }


def _volumes(
    pipeline: names.PipelineRef, spec: spec_mod.PipelineSpec, digest: str
) -> list[dict[str, Any]]:
    return [
        {"name": "plan", "configMap": {"name": names.plan_configmap_name(pipeline, digest)}},
        {"name": "model", **_model_volume(spec.model.source)},
        {"name": "tmp", "emptyDir": {}},
    ]


def _model_volume(source: spec_mod.ModelSource) -> dict[str, Any]:
    if isinstance(source, spec_mod.PvcSource):
        return {"persistentVolumeClaim": {"claimName": source.claim_name, "readOnly": True}}
    if isinstance(source, spec_mod.HostPathSource):
        return {"hostPath": {"path": source.path, "type": "Directory"}}
    return {"emptyDir": {}}


def _http_probe(path: str, *, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    }


def _restricted() -> dict[str, Any]:
    """The Pod Security Standard `restricted` profile, container part."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
