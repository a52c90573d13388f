"""Reading model files for profiles: config.json, profile JSON, safetensors headers.

Only the 8-byte length and the JSON header of each `*.safetensors` file are read,
never the tensors, so profiling a 140 GB model reads a few kilobytes. The pure
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
        data = read_json(path)
        if "layerBytes" in data:
            if dtype is not None:
                raise ModelFileError(f"{path}: a profile JSON has a fixed dtype; drop --dtype")
            return profiles.ModelProfile.from_dict(data)
        return profiles.from_config(data, dtype=dtype, name=_name(data, path.parent))
    except profiles.ProfileError as error:
        raise ModelFileError(f"{path}: {error}") from error


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
