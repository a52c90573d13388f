"""How a model's files reach a stage pod: its volume, and the init containers that download
or convert them. One description (`Files`) serves the model every stage reads and the draft
model stage 0 reads beside it (spec.model.draft), so both come by the same mechanisms.

Pure: (spec, files, plan stage) -> plain dicts; `stages` puts them into the Deployment.
"""

from __future__ import annotations

import dataclasses
import posixpath
from collections.abc import Mapping
from typing import Any

from llmpipe_operator import spec as spec_mod
from llmpipe_operator.planning import profiles

WIDEST_STORED_BYTES = 4
"""Checkpoints ship in float32 at most, whatever dtype the stage runs in."""
SMALL_FILES_BYTES = 256 * 2**20
"""config, tokenizer and index files: a few MiB, generously."""
GGUF_DOWNLOAD = (
    "import os, sys\n"
    "from huggingface_hub import hf_hub_download\n"
    "hf_hub_download(repo_id=sys.argv[1], revision=sys.argv[2], filename=sys.argv[3],\n"
    "                local_dir=sys.argv[4], token=os.environ.get('HF_TOKEN') or None)\n"
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Files:
    """One model's files in a stage pod: where they come from and where they are mounted."""

    source: spec_mod.ModelSource
    profile: profiles.ModelProfile
    """Sizes the download emptyDir."""
    model_dir: str
    """Where the stage finds config.json (the --model-dir / --draft-model-dir flag)."""
    volume: str
    mount: str
    gguf_volume: str
    gguf_mount: str
    part: str
    """Names the init containers: fetch-<part>, fetch-<part>gguf... ("" or "draft-")."""
    whole: bool = False
    """Download every layer, the embeddings and the head (the draft model runs whole)."""


def model_files(spec: spec_mod.PipelineSpec) -> Files:
    """The model's files, which every stage reads (its own layers of them)."""
    return Files(
        source=spec.model.source,
        profile=spec.profile(),
        model_dir=spec.model.model_dir,
        volume="model",
        mount=spec_mod.MODELS_MOUNT,
        gguf_volume="gguf",
        gguf_mount="/gguf",
        part="",
    )


def draft_files(spec: spec_mod.PipelineSpec) -> Files | None:
    """The draft model's files, which stage 0 reads whole (None without spec.model.draft)."""
    draft, profile = spec.model.draft, spec.draft_profile()
    if draft is None or profile is None:
        return None
    return Files(
        source=draft.source,
        profile=profile,
        model_dir=draft.model_dir,
        volume="draft-model",
        mount=spec_mod.DRAFT_MOUNT,
        gguf_volume="draft-gguf",
        gguf_mount="/draft-gguf",
        part="draft-",
        whole=True,
    )


def image(spec: spec_mod.PipelineSpec) -> str:
    """The image the cluster policy resolved (policy.resolve runs before rendering)."""
    if not spec.runtime.image:
        raise ValueError("spec.runtime.image is unset: resolve the spec with the policy first")
    return spec.runtime.image


def restricted() -> dict[str, Any]:
    """The Pod Security Standard `restricted` profile, container part."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def volumes(files: Files) -> list[dict[str, Any]]:
    """The model volume and the GGUF file's, if any."""
    return [model_volume(files), *gguf_volumes(files)]


def model_volume(files: Files) -> dict[str, Any]:
    """The model directory: a claim, a host directory, or the download emptyDir."""
    source = files.source
    if isinstance(source, spec_mod.PvcSource):
        claim = {"claimName": source.claim_name, "readOnly": True}
        return {"name": files.volume, "persistentVolumeClaim": claim}
    if isinstance(source, spec_mod.HostPathSource):
        return {"name": files.volume, "hostPath": {"path": source.path, "type": "Directory"}}
    return {"name": files.volume, "emptyDir": {"sizeLimit": str(download_size_limit(files))}}


def gguf_volumes(files: Files) -> list[dict[str, Any]]:
    """The volume holding a GGUF file on a host path or claim (none for one downloaded)."""
    source = files.source
    if not isinstance(source, spec_mod.GgufSource) or source.hf_id is not None:
        return []
    if source.host_path is not None:
        return [{"name": files.gguf_volume, "hostPath": {"path": source.host_path, "type": "File"}}]
    claim = {"claimName": source.claim_name, "readOnly": True}
    return [{"name": files.gguf_volume, "persistentVolumeClaim": claim}]


def mount(files: Files) -> dict[str, Any]:
    """The stage container's read-only view of the model directory."""
    return {"name": files.volume, "mountPath": files.mount, "readOnly": True}


def init_containers(
    spec: spec_mod.PipelineSpec, files: Files, stage: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """What runs before the stage: a download (Hugging Face), a download and a conversion,
    or a conversion (GGUF); nothing for a claim or a host directory."""
    if isinstance(files.source, spec_mod.HuggingFaceSource):
        return [_download_container(spec, files, files.source, _slice(files, stage))]
    if isinstance(files.source, spec_mod.GgufSource):
        return _gguf_containers(spec, files, files.source, stage)
    return []


def _slice(files: Files, stage: Mapping[str, Any]) -> Mapping[str, Any]:
    """The layers to download: the stage's own, or every one for a model run whole."""
    if not files.whole:
        return stage
    layers = files.profile.num_layers
    return {"layerStart": 0, "layerEnd": layers, "hasEmbedding": True, "hasHead": True}


def _download_container(
    spec: spec_mod.PipelineSpec,
    files: Files,
    source: spec_mod.HuggingFaceSource,
    stage: Mapping[str, Any],
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
        secret = {"name": source.token_secret_name, "key": source.token_secret_key}
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": secret}})
    return {
        "name": f"fetch-{files.part}model",
        "image": image(spec),
        "imagePullPolicy": spec.runtime.image_pull_policy or "IfNotPresent",
        "command": [
            "python",
            "-m",
            "llmpipe_stage.fetch",
            source.id,
            source.revision,
            files.model_dir,
            "--layer-start",
            str(int(stage["layerStart"])),
            "--layer-end",
            str(int(stage["layerEnd"])),
            *(["--embedding"] if stage.get("hasEmbedding") else []),
            *(["--head"] if stage.get("hasHead") else []),
        ],
        "env": env,
        "securityContext": restricted(),
        "volumeMounts": [
            {"name": files.volume, "mountPath": files.mount},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }


def download_size_limit(files: Files) -> int:
    """The download emptyDir's sizeLimit: the whole model at float32 plus small files.

    A stage fetches only its shards, but one shard may hold the whole model (single-file
    checkpoints), and the stored dtype may be wider than the one the stage runs in; so
    the bound is the model's parameters at the widest stored dtype. It stops a wrong
    repository id or a runaway download from filling the node's disk.
    """
    profile = files.profile
    params = profile.total_weight_bytes // profile.weight_bytes_per_param
    per_param = WIDEST_STORED_BYTES
    if isinstance(files.source, spec_mod.GgufSource):
        # the .gguf file (at most float32) and the directory converted from it, side by side
        per_param += profile.weight_bytes_per_param
    return params * per_param + SMALL_FILES_BYTES


def gguf_file_path(files: Files, source: spec_mod.GgufSource) -> str:
    """Where the init containers see the GGUF file."""
    if source.host_path is not None:
        return posixpath.join(files.gguf_mount, posixpath.basename(source.host_path))
    if source.claim_name is not None:
        return posixpath.join(files.gguf_mount, source.path)
    return posixpath.join(files.mount, "gguf", source.filename)


def _gguf_containers(
    spec: spec_mod.PipelineSpec,
    files: Files,
    source: spec_mod.GgufSource,
    stage: Mapping[str, Any],
) -> list[dict[str, Any]]:
    """Download the file (Hugging Face only), then convert it into the model emptyDir
    (`llmpipe_stage.gguf_convert`, dequantized to the stage's dtype)."""
    mounts: list[dict[str, Any]] = [
        {"name": files.volume, "mountPath": files.mount},
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
        download = _download_container(spec, files, hub, {"layerStart": 0, "layerEnd": 1})
        download["name"] = f"fetch-{files.part}gguf"
        download["command"] = [
            "python",
            "-c",
            GGUF_DOWNLOAD,
            source.hf_id,
            source.revision,
            source.filename,
            posixpath.join(files.mount, "gguf"),
        ]
        containers.append(download)
    else:
        at = files.gguf_mount if source.claim_name is not None else gguf_file_path(files, source)
        mounts.append({"name": files.gguf_volume, "mountPath": at, "readOnly": True})
    command = ["python", "-m", "llmpipe_stage.gguf_convert", gguf_file_path(files, source)]
    dtype = str(stage.get("dtype") or spec.model.planned_dtype)
    command += ["--out", files.model_dir, "--dtype", dtype]
    containers.append(
        {
            "name": f"convert-{files.part}gguf",
            "image": image(spec),
            "imagePullPolicy": spec.runtime.image_pull_policy or "IfNotPresent",
            "command": command,
            "env": [*(dict(item) for item in spec.runtime.env), {"name": "HOME", "value": "/tmp"}],
            "securityContext": restricted(),
            "volumeMounts": mounts,
        }
    )
    return containers
