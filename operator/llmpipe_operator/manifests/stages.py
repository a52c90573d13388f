"""Builders for one stage: its Deployment (pinned to the planned node) and its gRPC Service.

Pure: (pipeline, spec, plan stage, plan hash) -> plain dicts; `k8s` applies them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from llmpipe_operator import spec as spec_mod
from llmpipe_operator.manifests import model_files, names
from llmpipe_operator.planning import devices, inventory

CONFIG_DIR = "/etc/llmpipe"
API_KEYS_DIR = "/etc/llmpipe-api-keys"
TLS_DIR = "/var/run/llmpipe/tls"
TLS_FILE_MODE = 0o440
"""Owner root, group fsGroup (10001): the stage's user reads its key, nobody else does."""
RUN_AS_USER = 10001


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
    init = [
        container
        for files in _files(spec, index=index)
        for container in model_files.init_containers(spec, files, stage)
    ]
    if init:
        pod_spec["initContainers"] = init
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
        "image": model_files.image(spec),
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
        "securityContext": model_files.restricted(),
        "volumeMounts": [
            {"name": "plan", "mountPath": CONFIG_DIR, "readOnly": True},
            *(model_files.mount(files) for files in _files(spec, index=index)),
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
        _draft_with(container, model_files.draft_files(spec))
    return container


def _files(spec: spec_mod.PipelineSpec, *, index: int) -> list[model_files.Files]:
    """The model files a stage's pod holds: the model's, and on stage 0 the draft model's
    (spec.model.draft); other stages get nothing of the draft."""
    draft = model_files.draft_files(spec) if index == 0 else None
    return [model_files.model_files(spec), *([draft] if draft is not None else [])]


def _draft_with(container: dict[str, Any], draft: model_files.Files | None) -> None:
    """Stage 0's draft model directory (pipeline.json's `speculation: draft` turns the
    drafter on); a flag before `--model-dir`, which stays last."""
    if draft is None:
        return
    command: list[str] = container["command"]
    at = command.index("--model-dir")
    command[at:at] = ["--draft-model-dir", draft.model_dir]


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


def _volumes(
    pipeline: names.PipelineRef, spec: spec_mod.PipelineSpec, digest: str, *, index: int
) -> list[dict[str, Any]]:
    main, *rest = _files(spec, index=index)
    draft = rest[0] if rest else None
    volumes = [
        {"name": "plan", "configMap": {"name": names.plan_configmap_name(pipeline, digest)}},
        model_files.model_volume(main),
        {"name": "tmp", "emptyDir": {}},
        *model_files.gguf_volumes(main),
        *(model_files.volumes(draft) if draft is not None else []),
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


def _http_probe(path: str, *, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    }
