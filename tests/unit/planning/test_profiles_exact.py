"""Profiles from config.json equal profiles from the saved safetensors headers, byte for byte.

Covers Llama (GQA, untied; tied with attention and MLP biases), Mistral (explicit
head_dim), Qwen2 (q/k/v biases, tied), Qwen3 (q/k norms) and GPT-2 (tied, position
embeddings), stored in bfloat16, float16 and float32. The models are tiny and random,
generated once per session with transformers' `save_pretrained`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from llmpipe_cli import modelfiles
from llmpipe_operator.planning import profiles

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

_LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "vocab_size": 101,
    "max_position_embeddings": 64,
}

TINY_MODELS: dict[str, tuple[str, dict[str, Any], str]] = {
    "llama-gqa-bf16": ("LlamaConfig", {**_LLAMA, "num_key_value_heads": 2}, "bfloat16"),
    "llama-tied-bias-fp32": (
        "LlamaConfig",
        {**_LLAMA, "tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True},
        "float32",
    ),
    "mistral-headdim-fp16": (
        "MistralConfig",
        {**_LLAMA, "num_key_value_heads": 1, "head_dim": 32},
        "float16",
    ),
    "qwen2-tied-bf16": (
        "Qwen2Config",
        {**_LLAMA, "num_key_value_heads": 2, "tie_word_embeddings": True},
        "bfloat16",
    ),
    "qwen3-fp32": ("Qwen3Config", {**_LLAMA, "num_key_value_heads": 2, "head_dim": 8}, "float32"),
    "gpt2-fp32": (
        "GPT2Config",
        {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 40, "vocab_size": 97},
        "float32",
    ),
    "gpt2-inner-fp16": (
        "GPT2Config",
        {
            "n_embd": 32,
            "n_layer": 3,
            "n_head": 2,
            "n_positions": 16,
            "vocab_size": 50,
            "n_inner": 48,
        },
        "float16",
    ),
}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny-models")
    paths = {}
    for name, (config_class, fields, dtype) in TINY_MODELS.items():
        config = getattr(transformers, config_class)(**fields)
        model = transformers.AutoModelForCausalLM.from_config(config)
        model = model.to(getattr(torch, dtype))
        paths[name] = root / name
        model.save_pretrained(paths[name])
    return paths


models = pytest.mark.parametrize("model", sorted(TINY_MODELS))


@models
def test_config_profile_equals_safetensors_headers(
    tiny_models: dict[str, Path], model: str
) -> None:
    directory = tiny_models[model]
    config = json.loads((directory / "config.json").read_text())
    from_headers = modelfiles.load_profile(directory)
    from_config = profiles.from_config(config, name=from_headers.name)
    assert from_config == from_headers
    assert from_config.weight_bytes_per_param == profiles.DTYPE_BYTES[TINY_MODELS[model][2]]


@models
def test_profile_bytes_equal_the_tensor_bytes_on_disk(
    tiny_models: dict[str, Path], model: str
) -> None:
    """Layers + embeddings + head account for every stored byte (once more for a tied head)."""
    directory = tiny_models[model]
    headers = [modelfiles.read_safetensors_header(p) for p in directory.glob("*.safetensors")]
    stored = sum(
        end - start
        for header in headers
        for name, entry in header.items()
        if name != "__metadata__"
        for start, end in [entry["data_offsets"]]
    )
    profile = modelfiles.load_profile(directory)
    config = json.loads((directory / "config.json").read_text())
    tied = config.get("tie_word_embeddings", config["model_type"] == "gpt2")
    vocab, hidden = config["vocab_size"], profile.hidden_size
    copy = vocab * hidden * profile.weight_bytes_per_param if tied else 0
    assert profile.total_weight_bytes == stored + copy


@models
def test_kv_bytes_match_the_cache_transformers_allocates(
    tiny_models: dict[str, Path], model: str
) -> None:
    directory = tiny_models[model]
    profile = modelfiles.load_profile(directory)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(directory)
    dtype = getattr(torch, TINY_MODELS[model][2])
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        out = loaded.to(dtype)(tokens, use_cache=True)
    cache = out.past_key_values
    layer0 = cache.layers[0]
    per_token = (layer0.keys.numel() + layer0.values.numel()) * layer0.keys.element_size()
    assert profile.kv_bytes_per_token_per_layer * tokens.shape[1] == per_token


def test_dtype_override_scales_every_size(tiny_models: dict[str, Path]) -> None:
    directory = tiny_models["llama-gqa-bf16"]
    as_stored = modelfiles.load_profile(directory)
    as_fp32 = modelfiles.load_profile(directory, dtype="fp32")
    assert as_fp32.layer_bytes == tuple(2 * b for b in as_stored.layer_bytes)
    assert as_fp32.embed_bytes == 2 * as_stored.embed_bytes
    assert as_fp32.kv_bytes_per_token_per_layer == 2 * as_stored.kv_bytes_per_token_per_layer
    assert as_fp32.activation_bytes == 4
