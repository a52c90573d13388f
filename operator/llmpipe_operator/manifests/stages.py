"""Builders for one stage: its Deployment (pinned to the planned node) and its gRPC Service.

Pure: (pipeline, spec, plan stage, plan hash) -> plain dicts; `k8s` applies them.
"""

from __future__ import annotations

import math
import posixpath
from collections.abc import Mapping
from typing import Any

from llmpipe_operator import spec as spec_mod
from llmpipe_operator.manifests import names
from llmpipe_operator.planning import devices, inventory

CONFIG_DIR = "/etc/llmpipe"
API_KEYS_DIR = "/etc/llmpipe-api-keys"
TLS_DIR = "/var/run/llmpipe/tls"
TLS_FILE_MODE = 0o440
"""Owner root, group fsGroup (10001): the stage's user reads its key, nobody else does."""
RUN_AS_USER = 10001
WIDEST_STORED_BYTES = 4
"""Checkpoints ship in float32 at most, whatever dtype the stage runs in."""
SMALL_FILES_BYTES = 256 * 2**20
"""config, tokenizer and index files: a few MiB, generously."""


STAGE_DRAIN_S = 50
"""A stage pod being deleted serves what it holds this long after SIGTERM (the stage's
`--drain-timeout`: stage 0 refuses new requests and finishes its own). The plan already
drained for `spec.replan.drainSeconds` before its pods are deleted; this catches the
rest without a preStop hook (the process drains itself on SIGTERM)."""
TERMINATION_GRACE_S = STAGE_DRAIN_S + 10
"""The kubelet's SIGKILL comes after the drain bound, with time to close the servers."""


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
        "containers": [_stage_container(spec, stage)],
        "volumes": _volumes(pipeline, spec, digest, index=index),
        "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
    }
    if spec.placement.tolerations:
        pod_spec["tolerations"] = [t.to_dict() for t in spec.placement.tolerations]
    if on_gpu(stage) and spec.runtime.runtime_class_name:
        # Only GPU stages: a node without the NVIDIA runtime has no handler for the class.
        pod_spec["runtimeClassName"] = spec.runtime.runtime_class_name
    if isinstance(spec.model.source, spec_mod.HuggingFaceSource):
        pod_spec["initContainers"] = [_download_container(spec, spec.model.source, stage)]
    if isinstance(spec.model.source, spec_mod.GgufSource):
        pod_spec["initContainers"] = _gguf_containers(spec, spec.model.source, stage)
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
            # Neighbours reach a stage whatever its readiness: stage 0's /readyz reports the
            # whole pipeline, and the last stage returns tokens through this Service, so
            # the ring must not wait on its own readiness. A stage still loading refuses
            # calls itself (UNAVAILABLE). Users reach stage 0 through the endpoint Service,
            # which does follow readiness.
            "publishNotReadyAddresses": True,
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


def _image(spec: spec_mod.PipelineSpec) -> str:
    """The image the cluster policy resolved (policy.resolve runs before rendering)."""
    if not spec.runtime.image:
        raise ValueError("spec.runtime.image is unset: resolve the spec with the policy first")
    return spec.runtime.image


def _pin_to_node(node: str) -> dict[str, Any]:
    term = {
        "matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]
    }
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}
        }
    }


def _stage_container(spec: spec_mod.PipelineSpec, stage: Mapping[str, Any]) -> dict[str, Any]:
    index = int(stage["index"])
    container: dict[str, Any] = {
        "name": "stage",
        "image": _image(spec),
        "imagePullPolicy": spec.runtime.image_pull_policy or "IfNotPresent",
        "command": [
            "python",
            "-m",
            "llmpipe_stage",
            "--config-dir",
            CONFIG_DIR,
            "--tls-dir",
            TLS_DIR,
            "--stage-index",
            str(index),
            "--drain-timeout",
            str(STAGE_DRAIN_S),
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
            # Not a subPath mount: the kubelet then updates the files when the operator
            # renews the certificate, and the stage reloads them.
            {"name": "tls", "mountPath": TLS_DIR, "readOnly": True},
        ],
    }
    container["resources"] = stage_resources(spec.runtime.resources, stage)
    threads = thread_count(spec.runtime.resources) if not on_gpu(stage) else None
    if threads is not None:
        command: list[str] = container["command"]
        at = command.index("--model-dir")
        command[at:at] = ["--threads", str(threads)]
    if index == 0:
        _serve_the_api(container, spec.service)
    return container


def on_gpu(stage: Mapping[str, Any]) -> bool:
    """Whether the plan puts this stage on its node's GPU (plans before devices: no)."""
    return stage.get("device") == "cuda"


DEFAULT_CPU_REQUEST = "100m"
"""A stage with no CPU request in spec.runtime.resources still asks for a tenth of a core,
so the scheduler (and whoever reads the node's requests) sees it computing there, without
reserving cores the planner does not budget (it plans memory, not CPU requests)."""


def stage_resources(resources: Mapping[str, Any], stage: Mapping[str, Any]) -> dict[str, Any]:
    """spec.runtime.resources with the memory the plan reserves for the stage, its GPU, and
    a CPU request.

    requests.memory is the plan's hostMemoryBytes (weights + KV cache + runtime overhead;
    on a discrete GPU only the overhead, the rest lives in GPU memory), so the scheduler
    and every other pipeline's planner see what this stage holds. The limit is the same
    figure unless spec.runtime.resources sets a larger one: the stage preallocates its KV
    cache, so going past its reservation means a leak, and a leak should kill this stage,
    not its neighbours on the node. A GPU stage gets `nvidia.com/gpu` as a limit (extended
    resources are requested through their limit): the device plugin then gives the
    container exactly the GPUs the plan counted.
    """
    reserved = int(stage.get("hostMemoryBytes", stage["memoryBytes"]))
    requests = dict(resources.get("requests") or {})
    limits = dict(resources.get("limits") or {})
    requests["memory"] = str(reserved)
    limit = limits.get("memory")
    if limit is None or _quantity(limit) < reserved:
        limits["memory"] = str(reserved)
    if "cpu" not in requests:
        requests["cpu"] = limits.get("cpu", DEFAULT_CPU_REQUEST)
    gpus = int(stage.get("gpus", 0))
    if on_gpu(stage) and gpus > 0:
        limits[devices.RESOURCE_GPU] = str(gpus)
        requests.pop(devices.RESOURCE_GPU, None)  # equal to the limit when given; let it follow
    return {**resources, "requests": requests, "limits": limits}


def thread_count(resources: Mapping[str, Any]) -> int | None:
    """torch threads for a CPU stage: its CPU limit, else its CPU request, rounded up (at
    least 1). torch otherwise starts a thread per host core, and under a CFS quota smaller
    than the host those threads wait on each other. None when neither is set (the default
    CPU request of `stage_resources` says nothing about the cores the stage may use)."""
    for part in ("limits", "requests"):
        value = (resources.get(part) or {}).get("cpu")
        if value is None:
            continue
        try:
            cores = inventory.parse_cpu(value)
        except ValueError:
            continue  # the API server refuses a malformed quantity
        return max(1, math.ceil(cores))
    return None


def _quantity(value: Any) -> int:
    try:
        return inventory.parse_quantity(value)
    except ValueError:
        return 0  # the API server refuses a malformed quantity; ours replaces it meanwhile


def _serve_the_api(container: dict[str, Any], service: spec_mod.ServiceSpec) -> None:
    """Stage 0's OpenAI API: the prompt bound, and the API keys when a Secret is named
    (flags before `--model-dir`, which stays last)."""
    flags = ["--max-prompt-chars", str(service.max_prompt_characters)]
    if service.auth.api_key_secret is not None:
        flags += ["--api-keys", API_KEYS_DIR]
        if service.auth.protect_metrics:
            flags.append("--protect-metrics")
    command: list[str] = container["command"]
    at = command.index("--model-dir")
    command[at:at] = flags
    if service.auth.api_key_secret is None:
        return
    container["volumeMounts"].append(
        {"name": "api-keys", "mountPath": API_KEYS_DIR, "readOnly": True}
    )


def _download_container(
    spec: spec_mod.PipelineSpec, source: spec_mod.HuggingFaceSource, stage: Mapping[str, Any]
) -> dict[str, Any]:
    """Fetches the stage's files into the pod's emptyDir (llmpipe_stage.fetch: its shards,
    config, and the tokenizer on the end stages); only this container sees the token. It
    gets spec.runtime.env too (HF_ENDPOINT, HTTPS_PROXY, ...), before our own variables."""
    env: list[dict[str, Any]] = [
        *(dict(item) for item in spec.runtime.env),
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
        "image": _image(spec),
        "imagePullPolicy": spec.runtime.image_pull_policy or "IfNotPresent",
        "command": [
            "python",
            "-m",
            "llmpipe_stage.fetch",
            source.id,
            source.revision,
            spec.model.model_dir,
            "--layer-start",
            str(int(stage["layerStart"])),
            "--layer-end",
            str(int(stage["layerEnd"])),
            *(["--embedding"] if stage.get("hasEmbedding") else []),
            *(["--head"] if stage.get("hasHead") else []),
        ],
        "env": env,
        "securityContext": _restricted(),
        "volumeMounts": [
            {"name": "model", "mountPath": spec_mod.MODELS_MOUNT},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }


def _volumes(
    pipeline: names.PipelineRef, spec: spec_mod.PipelineSpec, digest: str, *, index: int
) -> list[dict[str, Any]]:
    volumes = [
        {"name": "plan", "configMap": {"name": names.plan_configmap_name(pipeline, digest)}},
        {"name": "model", **_model_volume(spec)},
        {"name": "tmp", "emptyDir": {}},
        *_gguf_volumes(spec.model.source),
        {
            "name": "tls",
            "secret": {
                "secretName": names.stage_tls_secret_name(pipeline, digest, index),
                "defaultMode": TLS_FILE_MODE,
            },
        },
    ]
    if index == 0 and spec.service.auth.api_key_secret is not None:
        # A volume, not env: the kubelet updates its files when the Secret changes, and
        # the gateway re-reads them (rotation without a restart). Group-readable for the
        # stage's fsGroup only.
        secret = {"secretName": spec.service.auth.api_key_secret, "defaultMode": 0o440}
        volumes.append({"name": "api-keys", "secret": secret})
    return volumes


def _model_volume(spec: spec_mod.PipelineSpec) -> dict[str, Any]:
    source = spec.model.source
    if isinstance(source, spec_mod.PvcSource):
        return {"persistentVolumeClaim": {"claimName": source.claim_name, "readOnly": True}}
    if isinstance(source, spec_mod.HostPathSource):
        return {"hostPath": {"path": source.path, "type": "Directory"}}
    return {"emptyDir": {"sizeLimit": str(download_size_limit(spec))}}


def download_size_limit(spec: spec_mod.PipelineSpec) -> int:
    """The download emptyDir's sizeLimit: the whole model at float32 plus small files.

    A stage fetches only its shards, but one shard may hold the whole model (single-file
    checkpoints), and the stored dtype may be wider than the one the stage runs in; so
    the bound is the model's parameters at the widest stored dtype. It stops a wrong
    repository id or a runaway download from filling the node's disk.
    """
    profile = spec.profile()
    params = profile.total_weight_bytes // profile.weight_bytes_per_param
    per_param = WIDEST_STORED_BYTES
    if isinstance(spec.model.source, spec_mod.GgufSource):
        # the .gguf file (at most float32) and the directory converted from it, side by side
        per_param += profile.weight_bytes_per_param
    return params * per_param + SMALL_FILES_BYTES


GGUF_MOUNT = "/gguf"
GGUF_DOWNLOAD = (
    "import os, sys\n"
    "from huggingface_hub import hf_hub_download\n"
    "hf_hub_download(repo_id=sys.argv[1], revision=sys.argv[2], filename=sys.argv[3],\n"
    "                local_dir=sys.argv[4], token=os.environ.get('HF_TOKEN') or None)\n"
)


def gguf_file_path(source: spec_mod.GgufSource) -> str:
    """Where the init containers see the GGUF file."""
    if source.host_path is not None:
        return posixpath.join(GGUF_MOUNT, posixpath.basename(source.host_path))
    if source.claim_name is not None:
        return posixpath.join(GGUF_MOUNT, source.path)
    return posixpath.join(spec_mod.MODELS_MOUNT, "gguf", source.filename)


def _gguf_volumes(source: spec_mod.ModelSource) -> list[dict[str, Any]]:
    if not isinstance(source, spec_mod.GgufSource) or source.hf_id is not None:
        return []
    if source.host_path is not None:
        return [{"name": "gguf", "hostPath": {"path": source.host_path, "type": "File"}}]
    claim = {"claimName": source.claim_name, "readOnly": True}
    return [{"name": "gguf", "persistentVolumeClaim": claim}]


def _gguf_containers(
    spec: spec_mod.PipelineSpec, source: spec_mod.GgufSource, stage: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """Download the file (Hugging Face only), then convert it into the model emptyDir
    (`llmpipe_stage.gguf_convert`, dequantized to the stage's dtype)."""
    mounts: list[dict[str, Any]] = [
        {"name": "model", "mountPath": spec_mod.MODELS_MOUNT},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    containers = []
    if source.hf_id is not None:
        hub = spec_mod.HuggingFaceSource(
            id=source.hf_id,
            revision=source.revision,
            token_secret_name=source.token_secret_name,
            token_secret_key=source.token_secret_key,
        )
        download = _download_container(spec, hub, {"layerStart": 0, "layerEnd": 1})
        download["name"] = "fetch-gguf"
        download["command"] = [
            "python",
            "-c",
            GGUF_DOWNLOAD,
            source.hf_id,
            source.revision,
            source.filename,
            posixpath.join(spec_mod.MODELS_MOUNT, "gguf"),
        ]
        containers.append(download)
    else:
        mount = GGUF_MOUNT if source.claim_name is not None else gguf_file_path(source)
        mounts.append({"name": "gguf", "mountPath": mount, "readOnly": True})
    command = ["python", "-m", "llmpipe_stage.gguf_convert", gguf_file_path(source)]
    dtype = str(stage.get("dtype") or spec.model.planned_dtype)
    command += ["--out", spec.model.model_dir, "--dtype", dtype]
    containers.append(
        {
            "name": "convert-gguf",
            "image": _image(spec),
            "imagePullPolicy": spec.runtime.image_pull_policy or "IfNotPresent",
            "command": command,
            "env": [*(dict(item) for item in spec.runtime.env), {"name": "HOME", "value": "/tmp"}],
            "securityContext": _restricted(),
            "volumeMounts": mounts,
        }
    )
    return containers


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
