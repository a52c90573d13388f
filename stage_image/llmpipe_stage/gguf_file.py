"""Reading GGUF files: the header (metadata, tensor table), the transformers config its
metadata describes, and dequantized tensors.

Pure computation over a read-only memory map, numpy only (no torch), so the operator's
`llmpipe profile` can read a header too. The file layout: magic `GGUF`, version (2 or 3),
tensor and key-value counts, typed key-value metadata, one info record per tensor (name,
dimensions fastest-varying first, type, offset), then the aligned data section. Every
length is checked against the file's size, so a truncated or corrupt file fails with an
error that names the file and the tensor, never with an index error or silent garbage.

Dequantization follows ggml's block formats (a block of 32 or 256 values: scale(s) as
float16, packed integer codes); each kernel below is written from that layout.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_COUNT = 1 << 32
"""No real file has billions of tensors, keys or array items: a larger count is corruption."""

Floats = npt.NDArray[np.float32]
Bytes = npt.NDArray[np.uint8]


class GgufError(ValueError):
    """A GGUF file that cannot be read or converted; the text names the file (and tensor)."""


# ggml's tensor types by id; the names appear in errors about types we do not convert.
TYPE_NAMES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
    30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]
    """GGUF order: the fastest-varying (contiguous) dimension first."""
    type_id: int
    offset: int
    """Absolute byte offset in the file."""

    @property
    def shape(self) -> tuple[int, ...]:
        """Row-major (numpy/torch) shape: the dimensions reversed."""
        return tuple(reversed(self.dims))

    @property
    def type_name(self) -> str:
        return TYPE_NAMES.get(self.type_id, f"type {self.type_id}")

    @property
    def numel(self) -> int:
        count = 1
        for d in self.dims:
            count *= d
        return count


@dataclass(frozen=True)
class GgufHeader:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    data_start: int
    file_size: int

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)


# -- dequantization kernels: raw blocks [n, block_bytes] uint8 -> values [n, block_elems] -----
def _f16(raw: Bytes) -> Floats:
    return raw.copy().view(np.float16).astype(np.float32)


def _nibbles(packed: Bytes) -> Bytes:
    """[n, k] packed bytes -> [n, 2k] codes: the low nibbles of every byte, then the high."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=1)


def dequant_q8_0(blocks: Bytes) -> Floats:
    # block: d (f16), 32 x int8
    d = _f16(blocks[:, 0:2])
    q = blocks[:, 2:34].copy().view(np.int8).astype(np.float32)
    out: Floats = d * q
    return out


def dequant_q4_0(blocks: Bytes) -> Floats:
    # block: d (f16), 16 bytes of 4-bit codes; x = d * (code - 8)
    d = _f16(blocks[:, 0:2])
    q = _nibbles(blocks[:, 2:18]).astype(np.int8) - np.int8(8)
    out: Floats = d * q.astype(np.float32)
    return out


def dequant_q4_1(blocks: Bytes) -> Floats:
    # block: d (f16), m (f16), 16 bytes of 4-bit codes; x = d * code + m
    d = _f16(blocks[:, 0:2])
    m = _f16(blocks[:, 2:4])
    q = _nibbles(blocks[:, 4:20]).astype(np.float32)
    out: Floats = d * q + m
    return out


def _q4_k_scales(packed: Bytes) -> tuple[Bytes, Bytes]:
    """12 bytes -> 8 six-bit scales and 8 six-bit mins (one pair per sub-block of 32).

    Sub-blocks 0-3 keep their scale and min in the low 6 bits of bytes 0-3 and 4-7; sub-blocks
    4-7 take their low 4 bits from bytes 8-11 (scale low nibble, min high nibble) and their top
    2 bits from the spare top bits of bytes 0-3 (scale) and 4-7 (min).
    """
    low, mid, tail = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([low & 0x3F, (tail & 0x0F) | ((low >> 6) << 4)], axis=1)
    mins = np.concatenate([mid & 0x3F, (tail >> 4) | ((mid >> 6) << 4)], axis=1)
    return scales, mins


def dequant_q4_k(blocks: Bytes) -> Floats:
    # block of 256: d (f16), dmin (f16), 12 bytes of scales/mins, 128 bytes of 4-bit codes.
    # Codes come in 4 runs of 32 bytes: low nibbles are sub-block 2r, high nibbles 2r+1.
    n = blocks.shape[0]
    d = _f16(blocks[:, 0:2])
    dmin = _f16(blocks[:, 2:4])
    scales, mins = _q4_k_scales(blocks[:, 4:16])
    runs = blocks[:, 16:144].reshape(n, 4, 1, 32)
    codes = np.concatenate([runs & 0x0F, runs >> 4], axis=2).reshape(n, 8, 32)
    step = (d * scales.astype(np.float32))[:, :, None]  # [n, 8, 1]
    offset = (dmin * mins.astype(np.float32))[:, :, None]
    out: Floats = (step * codes.astype(np.float32) - offset).reshape(n, 256)
    return out


def dequant_q6_k(blocks: Bytes) -> Floats:
    # block of 256: ql (128 bytes, low 4 bits), qh (64 bytes, high 2 bits), 16 int8 scales (one
    # per 16 values), d (f16). Each half of 128 values uses 64 bytes of ql and 32 of qh: value
    # l (l < 32) of quarter k takes ql's low (k even) or high (k odd) nibble of byte
    # l + 32 * (k % 2) and bits 2k..2k+1 of qh byte l.
    n = blocks.shape[0]
    ql = blocks[:, 0:128].reshape(n, 2, 2, 32)  # [n, half, which 32 bytes, 32]
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32)
    scales = blocks[:, 192:208].copy().view(np.int8).astype(np.float32)
    d = _f16(blocks[:, 208:210])
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)  # [n, half, quarter, 32]
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    high = (qh >> shifts) & 0x03  # [n, half, quarter, 32]
    codes = (low | (high << 4)).astype(np.int8) - np.int8(32)
    step = (d * scales)[:, :, None]  # [n, 16, 1]
    out: Floats = (step * codes.reshape(n, 16, 16).astype(np.float32)).reshape(n, 256)
    return out


@dataclass(frozen=True)
class Quant:
    name: str
    block_elems: int
    block_bytes: int
    dequantize: Callable[[Bytes], Floats]


def _plain(dtype: type[np.generic]) -> Callable[[Bytes], Floats]:
    def convert(blocks: Bytes) -> Floats:
        out: Floats = blocks.copy().view(dtype).astype(np.float32)
        return out

    return convert


def _bf16(blocks: Bytes) -> Floats:
    # bfloat16 is the top half of a float32: widen by shifting 16 bits up.
    wide = blocks.copy().view(np.uint16).astype(np.uint32) << 16
    out: Floats = wide.view(np.float32)
    return out


QUANTS: dict[int, Quant] = {
    0: Quant("F32", 1, 4, _plain(np.float32)),
    1: Quant("F16", 1, 2, _plain(np.float16)),
    30: Quant("BF16", 1, 2, _bf16),
    8: Quant("Q8_0", 32, 34, dequant_q8_0),
    2: Quant("Q4_0", 32, 18, dequant_q4_0),
    3: Quant("Q4_1", 32, 20, dequant_q4_1),
    12: Quant("Q4_K", 256, 144, dequant_q4_k),
    14: Quant("Q6_K", 256, 210, dequant_q6_k),
}
SUPPORTED_TYPES = tuple(q.name for q in QUANTS.values())
ARCHITECTURES = {"llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM")}
"""GGUF architecture -> (transformers model_type, class); the stages run these families."""


def quant_of(info: TensorInfo, *, path: Path) -> Quant:
    quant = QUANTS.get(info.type_id)
    if quant is None:
        raise GgufError(
            f"{path}: tensor {info.name!r} is stored as {info.type_name}, which llmpipe does "
            f"not dequantize; supported: {', '.join(SUPPORTED_TYPES)}"
        )
    return quant


def tensor_nbytes(info: TensorInfo, *, path: Path) -> int:
    quant = quant_of(info, path=path)
    if not info.dims or info.dims[0] % quant.block_elems:
        raise GgufError(
            f"{path}: tensor {info.name!r}: first dimension {info.dims[:1]} is not a multiple "
            f"of the {quant.name} block size {quant.block_elems} (corrupt tensor table?)"
        )
    return info.numel // quant.block_elems * quant.block_bytes


# -- the header --------------------------------------------------------------------------------
_SCALARS: dict[int, str] = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
    11: "<q", 12: "<d",
}  # fmt: skip
_STRING, _ARRAY = 8, 9
_NUMPY: dict[int, str] = {
    0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8",
    11: "<i8", 12: "<f8",
}  # fmt: skip


class _Cursor:
    """Reads little-endian values from a buffer; running off its end raises GgufError."""

    def __init__(self, buffer: mmap.mmap, path: Path) -> None:
        self.buffer = buffer
        self.path = path
        self.pos = 0
        self.where = "the header"

    def take(self, count: int) -> bytes:
        end = self.pos + count
        if count < 0 or end > len(self.buffer):
            raise GgufError(
                f"{self.path}: the file ends inside {self.where} (at byte {self.pos}, "
                f"{count} more bytes needed; {len(self.buffer)} in the file): truncated or corrupt"
            )
        data = self.buffer[self.pos : end]
        self.pos = end
        return data

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def count(self, what: str) -> int:
        value = int(self.scalar("<Q"))
        if value > MAX_COUNT:
            raise GgufError(f"{self.path}: implausible {what} {value} in {self.where} (corrupt)")
        return value

    def string(self) -> str:
        raw = self.take(self.count("string length"))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GgufError(
                f"{self.path}: a string in {self.where} is not UTF-8 (corrupt)"
            ) from None

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item = int(self.scalar("<I"))
            length = self.count("array length")
            if item in _NUMPY:
                dtype = np.dtype(_NUMPY[item])
                values = np.frombuffer(self.take(length * dtype.itemsize), dtype=dtype)
                return values.astype(bool).tolist() if item == 7 else values.tolist()
            return [self.value(item) for _ in range(length)]
        raise GgufError(f"{self.path}: unknown value type {kind} in {self.where} (corrupt)")


def read_header(path: Path) -> GgufHeader:
    """Parse the metadata and the tensor table; check every tensor lies inside the file."""
    try:
        with path.open("rb") as file:
            size = path.stat().st_size
            if size < 24:
                raise GgufError(f"{path}: {size} bytes is too short for a GGUF file")
            with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
                return _parse(buffer, path, size)
    except OSError as error:
        raise GgufError(f"{path}: {error.strerror or error}") from error


def _parse(buffer: mmap.mmap, path: Path, size: int) -> GgufHeader:
    cursor = _Cursor(buffer, path)
    if cursor.take(4) != MAGIC:
        raise GgufError(f"{path}: not a GGUF file (no 'GGUF' magic at its start)")
    version = int(cursor.scalar("<I"))
    if version not in (2, 3):
        raise GgufError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    n_tensors = cursor.count("tensor count")
    n_keys = cursor.count("metadata count")
    metadata: dict[str, Any] = {}
    for index in range(n_keys):
        cursor.where = f"metadata entry {index}"
        key = cursor.string()
        cursor.where = f"metadata {key!r}"
        metadata[key] = cursor.value(int(cursor.scalar("<I")))
    infos: list[tuple[str, tuple[int, ...], int, int]] = []
    for index in range(n_tensors):
        cursor.where = f"tensor info {index}"
        name = cursor.string()
        cursor.where = f"the info of tensor {name!r}"
        n_dims = int(cursor.scalar("<I"))
        if not 1 <= n_dims <= MAX_DIMS:
            raise GgufError(f"{path}: tensor {name!r} has {n_dims} dimensions (corrupt)")
        dims = tuple(int(cursor.scalar("<Q")) for _ in range(n_dims))
        infos.append((name, dims, int(cursor.scalar("<I")), int(cursor.scalar("<Q"))))
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    if alignment <= 0 or alignment & (alignment - 1):
        raise GgufError(f"{path}: general.alignment {alignment} is not a power of two")
    data_start = -(-cursor.pos // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, dims, type_id, offset in infos:
        info = TensorInfo(name, dims, type_id, data_start + offset)
        if name in tensors:
            raise GgufError(f"{path}: tensor {name!r} appears twice in the tensor table")
        tensors[name] = info
        if type_id in QUANTS:
            end = info.offset + tensor_nbytes(info, path=path)
            if end > size:
                raise GgufError(
                    f"{path}: tensor {name!r} ({info.type_name}, shape {list(info.shape)}) needs "
                    f"bytes up to {end} but the file has {size}: the file is truncated"
                )
    return GgufHeader(path, version, metadata, tensors, data_start, size)


# -- metadata -> transformers config ------------------------------------------------------
def architecture(header: GgufHeader) -> str:
    arch = header.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GgufError(
            f"{header.path}: architecture {arch!r} is not supported; supported: "
            f"{', '.join(sorted(ARCHITECTURES))}"
        )
    return str(arch)


def required(header: GgufHeader, key: str) -> Any:
    value = header.get(key)
    if value is None:
        raise GgufError(f"{header.path}: metadata {key!r} is missing")
    return value


def model_config(header: GgufHeader, *, dtype: str = "float32", name: str = "") -> dict[str, Any]:
    """The transformers config.json of the model in this file."""
    arch = architecture(header)
    model_type, class_name = ARCHITECTURES[arch]
    hidden = int(required(header, f"{arch}.embedding_length"))
    heads = int(required(header, f"{arch}.attention.head_count"))
    head_dim = int(header.get(f"{arch}.attention.key_length", hidden // heads))
    rotary = int(header.get(f"{arch}.rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise GgufError(
            f"{header.path}: partial rotary embeddings ({rotary} of {head_dim} dimensions) "
            "are not supported"
        )
    if "rope_freqs.weight" in header.tensors:
        raise GgufError(
            f"{header.path}: per-dimension rope frequencies (Llama 3.1 style) are not supported"
        )
    tokens = required(header, "tokenizer.ggml.tokens")
    config: dict[str, Any] = {
        "architectures": [class_name],
        "model_type": model_type,
        "_name_or_path": name or header.path.stem,
        "vocab_size": len(tokens),
        "hidden_size": hidden,
        "intermediate_size": int(required(header, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(required(header, f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(header.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "max_position_embeddings": int(header.get(f"{arch}.context_length", 2048)),
        "rms_norm_eps": float(header.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(header.get(f"{arch}.rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in header.tensors,
        "torch_dtype": dtype,
    }
    scaling = header.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise GgufError(f"{header.path}: rope scaling {scaling!r} is not supported (linear is)")
        factor = float(required(header, f"{arch}.rope.scaling.factor"))
        config["rope_scaling"] = {"rope_type": "linear", "factor": factor}
    if model_type == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    else:
        config.update(use_sliding_window=False)
    for field in ("bos", "eos", "padding"):
        value = header.get(f"tokenizer.ggml.{field}_token_id")
        if value is not None:
            config["pad_token_id" if field == "padding" else f"{field}_token_id"] = int(value)
    return config


# -- tensor data -------------------------------------------------------------------------------
class TensorReader:
    """Dequantizes tensors of one file on demand (the file stays memory-mapped while open)."""

    def __init__(self, header: GgufHeader) -> None:
        self.header = header
        self._file = header.path.open("rb")
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._map.close()
        self._file.close()

    def raw(self, name: str) -> Bytes:
        info = self.header.tensors[name]
        count = tensor_nbytes(info, path=self.header.path)
        if info.offset + count > len(self._map):
            raise GgufError(
                f"{self.header.path}: tensor {name!r} runs past the end of the file "
                "(it changed since its header was read?)"
            )
        # A copy (bytes), not a view: no buffer of the map outlives a tensor, so the map
        # always closes, whatever an error's traceback still holds.
        data: Bytes = np.frombuffer(self._map[info.offset : info.offset + count], dtype=np.uint8)
        return data

    def tensor(self, name: str) -> Floats:
        """The tensor as float32 in row-major shape; non-finite values mean corruption."""
        info = self.header.tensors[name]
        quant = quant_of(info, path=self.header.path)
        blocks = self.raw(name).reshape(-1, quant.block_bytes)
        values = quant.dequantize(blocks).reshape(info.shape)
        if not np.isfinite(values).all():
            raise GgufError(
                f"{self.header.path}: tensor {name!r} ({info.type_name}) holds NaN or infinite "
                "values after dequantization: the file is corrupt"
            )
        return values
