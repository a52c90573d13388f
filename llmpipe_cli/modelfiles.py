"""Reading model files for profiles: config.json, profile JSON, safetensors headers, GGUF.

Only the 8-byte length and the JSON header of each `*.safetensors` file are read,
never the tensors, so profiling a 140 GB model reads a few kilobytes. A GGUF file's
metadata and tensor table are read the same way (`llmpipe_stage.gguf_file`, numpy only):
its profile is that of the dequantized weights the stages load, at the chosen dtype
(default float32, what `llmpipe serve` converts to), not of the quantized file. The pure
computation lives in `planning.profiles`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from llmpipe_operator.planning import profiles

MAX_HEADER_BYTES = 100 * 2**20
"""safetensors caps its JSON header at 100 MB; a larger length means a corrupt file."""


class ModelFileError(ValueError):
    """A model path that cannot be profiled; the message names the file and the problem."""


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of one safetensors file (tensor names, dtypes, byte offsets)."""
    try:
        with path.open("rb") as file:
            prefix = file.read(8)
            if len(prefix) != 8:
                raise ModelFileError(f"{path}: too short to be a safetensors file")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES:
                raise ModelFileError(f"{path}: header length {length} is not plausible")
            raw = file.read(length)
    except OSError as error:
        raise ModelFileError(f"{path}: {error.strerror or error}") from error
    if len(raw) != length:
        raise ModelFileError(f"{path}: header truncated ({len(raw)} of {length} bytes)")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFileError(f"{path}: header is not JSON: {error}") from error
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: header is not a JSON object")
    return header


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as error:
        raise ModelFileError(f"{path}: {error.strerror or error}") from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFileError(f"{path}: not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ModelFileError(f"{path}: expected a JSON object")
    return data


def load_profile(path: Path, *, dtype: str | None = None) -> profiles.ModelProfile:
    """The profile of a model directory, a config.json or a profile JSON.

    A directory with safetensors files is profiled from their headers (exact as
    stored) unless `dtype` asks for another dtype; then, like a bare config.json,
    from its config.
    """
    try:
        if path.is_dir():
            return _from_directory(path, dtype=dtype)
        if path.suffix == ".gguf":
            return _from_gguf(path, dtype=dtype)
        data = read_json(path)
        if "layerBytes" in data:
            if dtype is not None:
                raise ModelFileError(f"{path}: a profile JSON has a fixed dtype; drop --dtype")
            return profiles.ModelProfile.from_dict(data)
        return profiles.from_config(data, dtype=dtype, name=_name(data, path.parent))
    except profiles.ProfileError as error:
        raise ModelFileError(f"{path}: {error}") from error


GGUF_DEFAULT_DTYPE = "float32"
"""What `llmpipe serve --model FILE.gguf` converts to (exact dequantized values)."""


def gguf_config(path: Path, *, dtype: str | None = None) -> dict[str, Any]:
    """The config.json of the model in a GGUF file (the converter's own mapping)."""
    try:
        from llmpipe_stage import gguf_file
    except ImportError as error:  # pragma: no cover - both images ship the stage package
        raise ModelFileError(f"{path}: reading GGUF needs the llmpipe_stage package") from error
    try:
        header = gguf_file.read_header(path)
        config: dict[str, Any] = gguf_file.model_config(header, dtype=dtype or GGUF_DEFAULT_DTYPE)
    except gguf_file.GgufError as error:
        raise ModelFileError(str(error)) from error
    return config


def _from_gguf(path: Path, *, dtype: str | None) -> profiles.ModelProfile:
    config = gguf_config(path, dtype=dtype)
    return profiles.from_config(
        config, dtype=dtype or GGUF_DEFAULT_DTYPE, name=str(config["_name_or_path"])
    )


def _from_directory(path: Path, *, dtype: str | None) -> profiles.ModelProfile:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelFileError(f"{path}: no config.json in this directory")
    config = read_json(config_path)
    name = _name(config, path)
    shards = sorted(path.glob("*.safetensors"))
    if dtype is not None or not shards:
        return profiles.from_config(config, dtype=dtype, name=name)
    headers = [read_safetensors_header(shard) for shard in shards]
    return profiles.from_safetensors_headers(headers, config=config, name=name)


def _name(config: dict[str, Any], directory: Path) -> str:
    declared = config.get("_name_or_path")
    if isinstance(declared, str) and declared:
        return declared
    return directory.resolve().name or str(config.get("model_type", "model"))
