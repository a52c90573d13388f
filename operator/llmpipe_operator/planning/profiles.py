"""Model profiles: what each decoder layer, the embeddings and the head weigh, in bytes.

A profile is computed either from a Hugging Face `config.json` (`from_config`) or from
the safetensors headers of a saved model (`from_safetensors_headers`); for the supported
families (Llama, Mistral, Qwen2, Qwen3, GPT-2) the two agree byte for byte.

Pure: takes mappings, returns a `ModelProfile`. Reading files lives in
`llmpipe_cli.modelfiles`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

DTYPE_BYTES: Mapping[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}
"""Bytes per element of the dtypes a stage can run in."""

_DTYPE_ALIASES: Mapping[str, str] = {
    "fp32": "float32",
    "f32": "float32",
    "float": "float32",
    "fp16": "float16",
    "f16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
}

_SAFETENSORS_DTYPE_BYTES: Mapping[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}

_LLAMA_FAMILY = frozenset({"llama", "mistral", "qwen2", "qwen3"})
SUPPORTED_MODEL_TYPES = frozenset(_LLAMA_FAMILY | {"gpt2"})

TOKEN_ID_BYTES = 4
"""Token ids travel back from the last stage to stage 0 as int32."""


class ProfileError(ValueError):
    """A config or a set of safetensors headers that no profile can be computed from."""


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The largest model dimensions a config may declare (docs/crd-reference.md lists them).

    Ten times the largest open models of 2025 (at most ~128 layers, hidden 16,384,
    vocabularies of ~260k): any real config passes, while a typo or a hostile spec cannot
    make the operator allocate per-layer tables of millions of entries or plan for minutes.
    """

    max_layers: int = 1024
    """Planning time and memory are linear in layers x nodes; 1,024 plans in about a second."""
    max_hidden: int = 65536
    """Activations on the wire are hidden x 2 bytes per token: 128 KiB at this bound."""
    max_inner: int = 524288
    """MLP width; 8x the largest hidden size allowed."""
    max_vocab: int = 1048576
    """The LM head is vocab x hidden; 2^20 tokens is 4x the largest tokenizer in use."""
    max_head_dim: int = 1024
    """Attention heads are 64-256 wide in practice."""
    max_positions: int = 1048576
    """GPT-2 style learned position tables (n_positions)."""


BOUNDS = Bounds()


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelProfile:
    """What a model weighs, per decoder layer, as docs/design.md's profile JSON describes."""

    name: str
    num_layers: int
    hidden_size: int
    layer_bytes: tuple[int, ...]
    """Exact stored size of decoder layer i's tensors."""
    embed_bytes: int
    """Token (and position) embeddings: held by stage 0."""
    head_bytes: int
    """Final norm + LM head; with tied embeddings the last stage holds its own copy."""
    kv_bytes_per_token_per_layer: int
    activation_bytes: int
    """Bytes per element of the hidden state sent between stages."""
    weight_bytes_per_param: int

    def __post_init__(self) -> None:
        if self.num_layers < 1 or len(self.layer_bytes) != self.num_layers:
            raise ProfileError(
                f"profile {self.name!r}: numLayers={self.num_layers} but "
                f"{len(self.layer_bytes)} layerBytes entries"
            )
        numbers = {
            "hiddenSize": self.hidden_size,
            "activationBytes": self.activation_bytes,
            "weightBytesPerParam": self.weight_bytes_per_param,
        }
        for field, value in numbers.items():
            if value <= 0:
                raise ProfileError(f"profile {self.name!r}: {field} must be > 0, got {value}")
        sizes = [*self.layer_bytes, self.embed_bytes, self.head_bytes]
        if min(sizes) < 0 or self.kv_bytes_per_token_per_layer < 0:
            raise ProfileError(f"profile {self.name!r}: byte sizes must not be negative")

    @property
    def total_weight_bytes(self) -> int:
        return sum(self.layer_bytes) + self.embed_bytes + self.head_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "numLayers": self.num_layers,
            "hiddenSize": self.hidden_size,
            "layerBytes": list(self.layer_bytes),
            "embedBytes": self.embed_bytes,
            "headBytes": self.head_bytes,
            "kvBytesPerTokenPerLayer": self.kv_bytes_per_token_per_layer,
            "activationBytes": self.activation_bytes,
            "weightBytesPerParam": self.weight_bytes_per_param,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelProfile:
        """Parse docs/design.md's profile JSON; a missing or mistyped field raises ProfileError."""
        layer_bytes = data.get("layerBytes")
        if not isinstance(layer_bytes, list) or not all(_is_int(x) for x in layer_bytes):
            raise ProfileError("profile: layerBytes must be a list of integers")
        return cls(
            name=str(data.get("name", "model")),
            num_layers=_int_field(data, "numLayers", default=len(layer_bytes)),
            hidden_size=_int_field(data, "hiddenSize"),
            layer_bytes=tuple(layer_bytes),
            embed_bytes=_int_field(data, "embedBytes"),
            head_bytes=_int_field(data, "headBytes"),
            kv_bytes_per_token_per_layer=_int_field(data, "kvBytesPerTokenPerLayer"),
            activation_bytes=_int_field(data, "activationBytes"),
            weight_bytes_per_param=_int_field(data, "weightBytesPerParam"),
        )


def normalize_dtype(dtype: str) -> str:
    """`bf16` -> `bfloat16`, `torch.float16` -> `float16`; unknown dtypes raise ProfileError."""
    name = dtype.strip().lower().removeprefix("torch.")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPE_BYTES:
        known = ", ".join(sorted(DTYPE_BYTES))
        raise ProfileError(f"unsupported dtype {dtype!r} (known: {known})")
    return name


def config_dtype(config: Mapping[str, Any]) -> str:
    """The dtype a config declares (`dtype`, or the older `torch_dtype`); float32 if none."""
    declared = config.get("dtype") or config.get("torch_dtype")
    if declared is None or declared == "auto":
        return "float32"
    return normalize_dtype(str(declared))


QUANTIZATIONS = ("none", "int8")
"""`spec.model.quantization`: int8 stores every projection weight (q, k, v, o, the MLP's
and the LM head) as one byte per weight plus one `dtype` scale per output row; norms,
biases and the token embeddings stay in `dtype`."""


def from_config(
    config: Mapping[str, Any],
    *,
    dtype: str | None = None,
    name: str | None = None,
    quantization: str = "none",
) -> ModelProfile:
    """The profile of a Hugging Face config, with weights stored in `dtype` (or, quantized,
    at the byte size the stage holds them in).

    `dtype` defaults to the config's own dtype. Sizes are exact for the supported
    families: they equal what `save_pretrained` writes into the safetensors headers, and
    for int8 what the stage's quantized projections take.
    """
    if quantization not in QUANTIZATIONS:
        raise ProfileError(f"unknown quantization {quantization!r} (known: {QUANTIZATIONS})")
    dims = _Dims.of(config)
    element = DTYPE_BYTES[normalize_dtype(dtype) if dtype else config_dtype(config)]
    layer = dims.layer_params() * element
    head = dims.head_params() * element
    per_param = element
    if quantization == "int8":
        if dims.family == "gpt2":
            raise ProfileError("int8 quantization is not supported for gpt2-family models")
        params, rows = dims.projections()
        # each projection weight: element bytes -> 1 byte, plus one scale per output row
        layer -= params * (element - 1) - rows * element
        head -= dims.vocab * dims.hidden * (element - 1) - dims.vocab * element
        per_param = 1
    return ModelProfile(
        name=name or _config_name(config),
        num_layers=dims.num_layers,
        hidden_size=dims.hidden,
        layer_bytes=(layer,) * dims.num_layers,
        embed_bytes=dims.embed_params() * element,
        head_bytes=head,
        kv_bytes_per_token_per_layer=dims.kv_elements_per_token() * element,
        activation_bytes=element,
        weight_bytes_per_param=per_param,
    )


def from_safetensors_headers(
    headers: Iterable[Mapping[str, Any]],
    *,
    config: Mapping[str, Any],
    name: str | None = None,
) -> ModelProfile:
    """The profile of a saved model, from its safetensors headers (tensor sizes as stored).

    `headers` are the parsed JSON headers of every `*.safetensors` file of the model;
    `config` supplies what the headers cannot (layer count, KV heads). A tensor that
    is neither a decoder layer's, an embedding nor part of the head raises ProfileError,
    so a model family we do not understand is never profiled wrongly.
    """
    dims = _Dims.of(config)
    layer_bytes = [0] * dims.num_layers
    embed = head = token_matrix = 0
    head_stored = False
    element_sizes: dict[int, int] = {}
    for tensor, nbytes, element in _tensors(headers):
        part, index = _classify(tensor)
        if part == "layer":
            if index >= dims.num_layers:
                raise ProfileError(
                    f"tensor {tensor!r} names layer {index}, config has {dims.num_layers}"
                )
            layer_bytes[index] += nbytes
            element_sizes[element] = element_sizes.get(element, 0) + nbytes
        elif part == "embed":
            embed += nbytes
            token_matrix = nbytes if _is_token_embedding(tensor) else token_matrix
        else:
            head += nbytes
            head_stored = head_stored or tensor.endswith("lm_head.weight")
    if not head_stored:
        head += token_matrix  # tied: the last stage keeps its own copy of the matrix
    if not element_sizes:
        raise ProfileError("the safetensors headers hold no decoder layer tensors")
    element = max(element_sizes, key=lambda size: element_sizes[size])
    return ModelProfile(
        name=name or _config_name(config),
        num_layers=dims.num_layers,
        hidden_size=dims.hidden,
        layer_bytes=tuple(layer_bytes),
        embed_bytes=embed,
        head_bytes=head,
        kv_bytes_per_token_per_layer=dims.kv_elements_per_token() * element,
        activation_bytes=element,
        weight_bytes_per_param=element,
    )


@dataclasses.dataclass(frozen=True)
class _Dims:
    """The shape facts of a config that the byte counts depend on."""

    family: str
    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    positions: int
    tied: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool

    @classmethod
    def of(cls, config: Mapping[str, Any]) -> _Dims:
        model_type = str(config.get("model_type", ""))
        if model_type not in SUPPORTED_MODEL_TYPES:
            known = ", ".join(sorted(SUPPORTED_MODEL_TYPES))
            raise ProfileError(f"unsupported model_type {model_type!r} (supported: {known})")
        dims = cls._gpt2(config) if model_type == "gpt2" else cls._llama(config, model_type)
        dims.check(BOUNDS)
        return dims

    def check(self, bounds: Bounds) -> None:
        """Refuse dimensions no real model has (ProfileError names the key and the bound)."""
        gpt2 = self.family == "gpt2"
        for key, value, limit in (
            ("n_layer" if gpt2 else "num_hidden_layers", self.num_layers, bounds.max_layers),
            ("n_embd" if gpt2 else "hidden_size", self.hidden, bounds.max_hidden),
            ("n_inner" if gpt2 else "intermediate_size", self.intermediate, bounds.max_inner),
            ("vocab_size", self.vocab, bounds.max_vocab),
            ("head_dim", self.head_dim, bounds.max_head_dim),
            ("n_positions", self.positions, bounds.max_positions),
        ):
            if value > limit:
                raise ProfileError(f"config: {key} is {value}, more than the bound of {limit:,}")
        heads_key = "n_head" if gpt2 else "num_attention_heads"
        if self.hidden % self.heads:
            raise ProfileError(
                f"config: {heads_key} ({self.heads}) must divide the hidden size ({self.hidden})"
            )
        if self.heads % self.kv_heads:
            raise ProfileError(
                f"config: num_key_value_heads ({self.kv_heads}) must divide "
                f"{heads_key} ({self.heads})"
            )
        if self.head_dim < 1:
            raise ProfileError(f"config: head_dim must be a positive integer, got {self.head_dim}")

    @classmethod
    def _llama(cls, config: Mapping[str, Any], model_type: str) -> _Dims:
        hidden = _config_int(config, "hidden_size")
        heads = _config_int(config, "num_attention_heads")
        head_dim = _config_int(config, "head_dim") if config.get("head_dim") else hidden // heads
        attention_bias = bool(config.get("attention_bias", False))
        return cls(
            family=model_type,
            num_layers=_config_int(config, "num_hidden_layers"),
            hidden=hidden,
            intermediate=_config_int(config, "intermediate_size"),
            heads=heads,
            kv_heads=(
                _config_int(config, "num_key_value_heads")
                if config.get("num_key_value_heads")
                else heads
            ),
            head_dim=int(head_dim),
            vocab=_config_int(config, "vocab_size"),
            positions=0,
            tied=bool(config.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases and none on o_proj; Llama and Qwen3 follow
            # `attention_bias` for all four projections.
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type != "qwen2" and attention_bias,
            mlp_bias=bool(config.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
        )

    @classmethod
    def _gpt2(cls, config: Mapping[str, Any]) -> _Dims:
        hidden = _config_int(config, "n_embd")
        heads = _config_int(config, "n_head")
        return cls(
            family="gpt2",
            num_layers=_config_int(config, "n_layer"),
            hidden=hidden,
            intermediate=int(config.get("n_inner") or 4 * hidden),
            heads=heads,
            kv_heads=heads,
            head_dim=hidden // heads,
            vocab=_config_int(config, "vocab_size"),
            positions=_config_int(config, "n_positions"),
            tied=bool(config.get("tie_word_embeddings", True)),
            qkv_bias=True,
            o_bias=True,
            mlp_bias=True,
            qk_norm=False,
        )

    def layer_params(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        if self.family == "gpt2":
            attention = h * 3 * h + 3 * h + h * h + h
            mlp = h * self.intermediate + self.intermediate + self.intermediate * h + h
            return attention + mlp + 2 * (2 * h)  # ln_1 and ln_2 have weight and bias
        attention = h * q + 2 * h * kv + q * h
        attention += (q + 2 * kv) * self.qkv_bias + h * self.o_bias
        attention += 2 * self.head_dim * self.qk_norm
        mlp = 3 * h * self.intermediate + (2 * self.intermediate + h) * self.mlp_bias
        return attention + mlp + 2 * h  # input and post-attention RMSNorm weights

    def projections(self) -> tuple[int, int]:
        """(weights, output rows) of one Llama-style layer's projections: q, k, v, o, gate,
        up, down."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        weights = h * q + 2 * h * kv + q * h + 3 * h * self.intermediate
        return weights, q + 2 * kv + h + 2 * self.intermediate + h

    def embed_params(self) -> int:
        return (self.vocab + self.positions) * self.hidden

    def head_params(self) -> int:
        norm = 2 * self.hidden if self.family == "gpt2" else self.hidden
        return norm + self.vocab * self.hidden  # tied or not, the last stage holds lm_head

    def kv_elements_per_token(self) -> int:
        return 2 * self.kv_heads * self.head_dim


_LAYER = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")
_EMBED = re.compile(r"(?:^|\.)(?:embed_tokens|wte|wpe)\.weight$")
_HEAD = re.compile(r"(?:^|\.)(?:norm|ln_f)\.(?:weight|bias)$|^lm_head\.weight$")


def _classify(tensor: str) -> tuple[str, int]:
    layer = _LAYER.search(tensor)
    if layer:
        return "layer", int(layer.group(1))
    if _EMBED.search(tensor):
        return "embed", -1
    if _HEAD.search(tensor):
        return "head", -1
    raise ProfileError(f"tensor {tensor!r} is neither a decoder layer, an embedding nor the head")


def _is_token_embedding(tensor: str) -> bool:
    return tensor.endswith(("embed_tokens.weight", "wte.weight"))


def _tensors(headers: Iterable[Mapping[str, Any]]) -> Iterable[tuple[str, int, int]]:
    """(name, stored bytes, bytes per element) of every tensor in the headers."""
    for header in headers:
        for tensor, entry in header.items():
            if tensor == "__metadata__":
                continue
            try:
                start, end = entry["data_offsets"]
                element = _SAFETENSORS_DTYPE_BYTES[entry["dtype"]]
            except (KeyError, TypeError, ValueError) as error:
                raise ProfileError(f"malformed safetensors entry for {tensor!r}") from error
            yield tensor, int(end) - int(start), element


def _config_name(config: Mapping[str, Any]) -> str:
    name = config.get("_name_or_path") or config.get("model_type") or "model"
    return str(name)


def _config_int(config: Mapping[str, Any], key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ProfileError(f"config: {key} must be a positive integer, got {value!r}")
    return int(value)


def _int_field(data: Mapping[str, Any], key: str, *, default: int | None = None) -> int:
    value = data.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProfileError(f"profile: {key} must be an integer, got {value!r}")
    return int(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
