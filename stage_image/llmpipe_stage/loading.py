"""Load one stage's slice of a model: only its decoder layers' tensors (plus the embeddings on
stage 0, the final norm and LM head on the last stage), read by key from the safetensors files.

Modules are the model family's own transformers classes (LlamaDecoderLayer, ...), built on
the meta device and then given the loaded tensors, so peak memory stays near the slice and
no attention code is re-implemented here. On a GPU the tensors go straight from the files
to the device through one small page-locked staging buffer (`read_tensors_to_device`):
the host never holds a copy of the slice. This module reads files; it serves nothing.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, PretrainedConfig


class LoadError(ValueError):
    """The model directory or the stage's slice cannot be loaded; the text says why."""


@dataclass(frozen=True)
class Family:
    """Where a model family's transformers classes live."""

    module: str
    decoder_layer: str
    rotary: str
    norm: str


FAMILIES: dict[str, Family] = {
    "llama": Family(
        "transformers.models.llama.modeling_llama",
        "LlamaDecoderLayer",
        "LlamaRotaryEmbedding",
        "LlamaRMSNorm",
    ),
    "mistral": Family(
        "transformers.models.mistral.modeling_mistral",
        "MistralDecoderLayer",
        "MistralRotaryEmbedding",
        "MistralRMSNorm",
    ),
    "qwen2": Family(
        "transformers.models.qwen2.modeling_qwen2",
        "Qwen2DecoderLayer",
        "Qwen2RotaryEmbedding",
        "Qwen2RMSNorm",
    ),
}

CPU = torch.device("cpu")
EMBED_KEY = "model.embed_tokens.weight"
NORM_KEY = "model.norm.weight"
HEAD_KEY = "lm_head.weight"


@dataclass
class StageSlice:
    """The modules one stage runs. Layers are global indices [layer_start, layer_end)."""

    config: PretrainedConfig
    layer_start: int
    layer_end: int
    layers: nn.ModuleList
    rotary: nn.Module
    embed: nn.Embedding | None
    norm: nn.Module | None
    head_weight: torch.Tensor | None  # [vocab, hidden]; the embedding matrix when tied
    dtype: torch.dtype
    device: torch.device = CPU

    @property
    def has_embedding(self) -> bool:
        return self.embed is not None

    @property
    def has_head(self) -> bool:
        return self.head_weight is not None


def require_readable(path: Path) -> None:
    """Raise LoadError saying "permission denied", the file and our uid, when this process
    may not read `path` (a directory: list and enter it). Without this check a 0600 file
    written by another user (transformers saves model.safetensors that way) surfaces as
    "No such file or directory" or an empty model directory, and the user looks for the
    wrong problem."""
    try:
        if path.is_dir():
            os.listdir(path)
        else:
            with path.open("rb"):
                pass
    except PermissionError as error:
        raise LoadError(permission_denied(path)) from error
    except FileNotFoundError:
        return  # the callers say what is missing, in their own words


def permission_denied(path: Path) -> str:
    try:
        info = path.stat()
        owner = f"owner uid {info.st_uid}, mode {stat.filemode(info.st_mode)}"
    except OSError:
        owner = "its directory is not readable either"
    uid = os.getuid()
    return (
        f"permission denied: {path} is not readable by uid {uid} ({owner}); make the model "
        f"files readable by uid {uid} (e.g. chmod -R a+rX on the model directory)"
    )


def load_config(model_dir: Path) -> PretrainedConfig:
    """Read config.json and check the family is one the runtime knows."""
    require_readable(model_dir)
    require_readable(model_dir / "config.json")
    if not (model_dir / "config.json").is_file():
        raise LoadError(f"{model_dir} has no config.json (is --model-dir a model directory?)")
    config: PretrainedConfig = AutoConfig.from_pretrained(model_dir)
    if config.model_type not in FAMILIES:
        raise LoadError(
            f"model type {config.model_type!r} is not supported; supported: {sorted(FAMILIES)}"
        )
    return config


def tensor_files(model_dir: Path) -> dict[str, Path]:
    """Map every tensor key to the safetensors file that holds it (index file or single file)."""
    index = model_dir / "model.safetensors.index.json"
    require_readable(index)
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: model_dir / name for key, name in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise LoadError(f"{model_dir} holds no *.safetensors files")
    keys: dict[str, Path] = {}
    for path in files:
        require_readable(path)
        with safe_open(str(path), framework="pt") as handle:
            keys.update(dict.fromkeys(handle.keys(), path))
    return keys


def needed_keys(
    config: PretrainedConfig,
    keys: dict[str, Path],
    *,
    layer_start: int,
    layer_end: int,
    has_embedding: bool,
    has_head: bool,
) -> list[str]:
    """The tensor keys this stage reads, in file order of appearance."""
    wanted = [
        key
        for key in keys
        if any(key.startswith(f"model.layers.{i}.") for i in range(layer_start, layer_end))
    ]
    if has_embedding:
        wanted.append(EMBED_KEY)
    if has_head:
        wanted.append(NORM_KEY)
        wanted.append(HEAD_KEY if HEAD_KEY in keys else EMBED_KEY)
    missing = [key for key in wanted if key not in keys]
    if missing:
        raise LoadError(f"tensors missing from the safetensors files: {missing[:5]}")
    return list(dict.fromkeys(wanted))


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes lie in its safetensors file."""

    path: Path
    key: str
    stored: torch.dtype
    begin: int  # absolute file offsets [begin, end)
    end: int
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def tensor_entries(keys: dict[str, Path], wanted: list[str]) -> Iterator[TensorEntry]:
    """The wanted tensors, file by file (each file's header read once, each file checked
    readable), with their stored dtype, absolute byte range and shape. Both readers walk
    this, the host one and the device one."""
    by_file: dict[Path, list[str]] = {}
    for key in wanted:
        by_file.setdefault(keys[key], []).append(key)
    for path, file_keys in by_file.items():
        require_readable(path)
        header, data_start = safetensors_header(path)
        for key in file_keys:
            entry = header[key]
            stored = SAFETENSORS_DTYPES.get(str(entry["dtype"]))
            if stored is None:
                raise LoadError(f"{path}: tensor {key} has dtype {entry['dtype']}")
            begin, end = (data_start + int(x) for x in entry["data_offsets"])
            yield TensorEntry(path, key, stored, begin, end, tuple(int(d) for d in entry["shape"]))


def read_tensors(
    keys: dict[str, Path],
    wanted: list[str],
    *,
    dtype: torch.dtype,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Read just `wanted` into host memory, one tensor at a time, converting each to the
    pipeline dtype.

    Each tensor's bytes are read (`readinto`, no mmap) straight into the tensor that keeps
    them when the file's dtype is the pipeline's, else into one transient tensor that the
    conversion replaces. Reading through safetensors' mmap instead made every page of the
    file this process touched count in its resident memory until the file was closed: a
    float32 file loaded as bfloat16 peaked at about 2x the slice (docs/benchmarks.md,
    "Peer benchmark"). The page cache still holds what the kernel read; it is not ours.
    """
    out: dict[str, torch.Tensor] = {}
    with open_files() as opened:
        for entry in tensor_entries(keys, wanted):
            file = opened(entry.path)
            raw = torch.empty(entry.nbytes, dtype=torch.uint8)
            view, done = raw.numpy().data, 0
            file.seek(entry.begin)
            while done < len(view):  # one read(2) returns at most ~2 GiB
                count = file.readinto(view[done:])
                if not count:
                    raise LoadError(f"{entry.path}: tensor {entry.key} is cut short")
                done += count
            out[entry.key] = raw.view(entry.stored).reshape(entry.shape).to(dtype)
            if progress is not None:
                progress(len(out), len(wanted))
    return out


STAGING_BYTES = 64 * 2**20
"""Page-locked staging buffer for loading onto a GPU: big enough to keep the copy engine
busy, small next to any slice (a 7B model's embedding matrix alone is 1 GiB)."""

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
}


@contextlib.contextmanager
def open_files() -> Iterator[Callable[[Path], io.FileIO]]:
    """A function that opens each file once (unbuffered, for readinto) and keeps it open
    until the block ends, when every file it opened is closed."""
    files: dict[Path, io.FileIO] = {}

    def opened(path: Path) -> io.FileIO:
        if path not in files:
            files[path] = path.open("rb", buffering=0)
        return files[path]

    try:
        yield opened
    finally:
        for file in files.values():
            file.close()


def safetensors_header(path: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """(the header's tensor entries, the file offset where the data starts)."""
    with path.open("rb") as file:
        (size,) = struct.unpack("<Q", file.read(8))
        if size > 100 * 2**20:
            raise LoadError(f"{path}: safetensors header of {size} bytes is not plausible")
        header = json.loads(file.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def read_tensors_to_device(
    keys: dict[str, Path],
    wanted: list[str],
    *,
    dtype: torch.dtype,
    device: torch.device,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Read just `wanted` into `device` memory, converting each to the pipeline dtype there.

    Each tensor's bytes go file -> staging buffer (page-locked, STAGING_BYTES) -> device,
    a chunk at a time: host memory holds one chunk, never a tensor or the slice (the page
    cache holds what the kernel read, as for any file read, and it is not this process's).
    """
    on_gpu = device.type == "cuda"
    staging = torch.empty(STAGING_BYTES, dtype=torch.uint8, pin_memory=on_gpu)
    window = staging.numpy().data
    out: dict[str, torch.Tensor] = {}
    with open_files() as opened:
        for entry in tensor_entries(keys, wanted):
            file = opened(entry.path)
            raw = torch.empty(entry.nbytes, dtype=torch.uint8, device=device)
            for offset in range(0, raw.numel(), STAGING_BYTES):
                count = min(STAGING_BYTES, raw.numel() - offset)
                file.seek(entry.begin + offset)
                if file.readinto(window[:count]) != count:
                    raise LoadError(f"{entry.path}: tensor {entry.key} is cut short")
                raw[offset : offset + count].copy_(staging[:count], non_blocking=on_gpu)
                if on_gpu:
                    torch.cuda.current_stream(device).synchronize()  # staging is reused
            out[entry.key] = raw.view(entry.stored).reshape(entry.shape).to(dtype)
            if progress is not None:
                progress(len(out), len(wanted))
    return out


def build_whole(
    model_dir: Path, *, dtype: torch.dtype, device: torch.device | None = None
) -> StageSlice:
    """The whole model as one slice (every layer, the embedding and the head), as a
    one-stage pipeline or a draft model runs it."""
    config = load_config(model_dir)
    return build_slice(
        model_dir,
        layer_start=0,
        layer_end=int(config.num_hidden_layers),
        has_embedding=True,
        has_head=True,
        dtype=dtype,
        device=device,
    )


def build_slice(
    model_dir: Path,
    *,
    layer_start: int,
    layer_end: int,
    has_embedding: bool,
    has_head: bool,
    dtype: torch.dtype,
    attn_implementation: str = "sdpa",
    progress: Callable[[int, int], None] | None = None,
    device: torch.device | None = None,
    on_layer: Callable[[nn.Module], None] | None = None,
) -> StageSlice:
    """Load the stage's modules from `model_dir` onto `device` (default the CPU); only its
    own tensors are read.

    Layers are read one at a time, and `on_layer` gets each one as soon as it is built,
    before the next is read: the runtime fuses (and quantizes) it there, so the float copy
    a quantized stage starts from is one layer at a time, never the slice."""
    device = device or CPU
    config = load_config(model_dir)
    config._attn_implementation = attn_implementation
    if not 0 <= layer_start < layer_end <= config.num_hidden_layers:
        raise LoadError(
            f"layer range [{layer_start}, {layer_end}) is outside the model's "
            f"{config.num_hidden_layers} layers"
        )
    family = FAMILIES[config.model_type]
    classes = importlib.import_module(family.module)
    keys = tensor_files(model_dir)
    wanted = needed_keys(
        config,
        keys,
        layer_start=layer_start,
        layer_end=layer_end,
        has_embedding=has_embedding,
        has_head=has_head,
    )
    done = 0

    def read(group: list[str]) -> dict[str, torch.Tensor]:
        nonlocal done
        before = done

        def step(count: int, _total: int) -> None:
            if progress is not None:
                progress(before + count, len(wanted))

        if device.type == "cpu":
            tensors = read_tensors(keys, group, dtype=dtype, progress=step)
        else:
            tensors = read_tensors_to_device(keys, group, dtype=dtype, device=device, progress=step)
        done += len(group)
        return tensors

    layers = nn.ModuleList()
    for index in range(layer_start, layer_end):
        prefix = f"model.layers.{index}."
        state = {
            k[len(prefix) :]: v
            for k, v in read([k for k in wanted if k.startswith(prefix)]).items()
        }
        with torch.device("meta"):
            layer = getattr(classes, family.decoder_layer)(config, layer_idx=index)
        layer.load_state_dict(state, strict=True, assign=True)
        del state
        layer = layer.eval()
        if on_layer is not None:
            on_layer(layer)
        layers.append(layer)

    tensors = read([k for k in wanted if not k.startswith("model.layers.")])
    embed = None
    if has_embedding:
        weight = tensors[EMBED_KEY]
        embed = nn.Embedding(weight.shape[0], weight.shape[1], _weight=weight, _freeze=True)
    norm = None
    head_weight = None
    if has_head:
        norm = getattr(classes, family.norm)(config.hidden_size, eps=config.rms_norm_eps)
        norm.load_state_dict({"weight": tensors[NORM_KEY]}, strict=True, assign=True)
        norm = norm.eval()
        head_weight = tensors[HEAD_KEY if HEAD_KEY in tensors else EMBED_KEY]
    # inv_freq stays float32, as in the full model (the rotary module casts cos/sin itself).
    rotary = getattr(classes, family.rotary)(config=config).eval().to(device)
    return StageSlice(
        config=config,
        layer_start=layer_start,
        layer_end=layer_end,
        layers=layers,
        rotary=rotary,
        embed=embed,
        norm=norm,
        head_weight=head_weight,
        dtype=dtype,
        device=device,
    )


def context_limit(config: PretrainedConfig) -> int:
    """The longest sequence the runtime handles exactly: no sliding-window masks are applied,
    so a window caps the context."""
    limit = int(config.max_position_embeddings)
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    uses_window = "sliding_attention" in layer_types or (
        config.model_type == "mistral" and window is not None
    )
    if uses_window and window:
        limit = min(limit, int(window))
    return limit
