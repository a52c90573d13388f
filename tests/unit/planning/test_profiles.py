"""Profiles from the published configs of real models (parameter counts as published),
the profile JSON round trip, dtype handling, and refusals of what cannot be profiled.
(Byte-exactness against saved safetensors headers: test_profiles_exact.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmpipe_operator.planning import profiles

MODELS = Path(__file__).parents[3] / "examples" / "models"


@pytest.mark.parametrize(
    ("model", "params", "kv_per_token_per_layer"),
    [
        # published parameter counts; KV = 2 (K and V) x kv_heads x head_dim x 2 bytes
        ("TinyLlama-1.1B", 1_100_048_384, 2 * 4 * 64 * 2),
        ("Llama-2-7B", 6_738_415_616, 2 * 32 * 128 * 2),
        ("Qwen2.5-7B", 7_615_616_512, 2 * 4 * 128 * 2),
        ("Llama-3-70B", 70_553_706_496, 2 * 8 * 128 * 2),
    ],
)
def test_real_configs_give_the_published_sizes(
    model: str, params: int, kv_per_token_per_layer: int
) -> None:
    config = json.loads((MODELS / model / "config.json").read_text())
    profile = profiles.from_config(config)
    assert profile.total_weight_bytes == 2 * params  # bf16/fp16 as published
    assert profile.kv_bytes_per_token_per_layer == kv_per_token_per_layer
    assert profile.num_layers == len(profile.layer_bytes) == config["num_hidden_layers"]


def test_tied_embeddings_count_the_head_copy() -> None:
    config = {
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    }
    profile = profiles.from_config(config)  # Qwen2.5-0.5B: 494,032,768 parameters stored
    assert profile.total_weight_bytes - profile.head_bytes + 896 * 2 == 2 * 494_032_768
    assert profile.head_bytes == (896 + 151936 * 896) * 2


def test_profile_json_round_trip() -> None:
    config = json.loads((MODELS / "TinyLlama-1.1B" / "config.json").read_text())
    profile = profiles.from_config(config, dtype="float32", name="tiny")
    data = json.loads(json.dumps(profile.to_dict()))
    assert list(data) == [
        "name",
        "numLayers",
        "hiddenSize",
        "layerBytes",
        "embedBytes",
        "headBytes",
        "kvBytesPerTokenPerLayer",
        "activationBytes",
        "weightBytesPerParam",
    ]
    assert profiles.ModelProfile.from_dict(data) == profile
    assert data["activationBytes"] == data["weightBytesPerParam"] == 4


@pytest.mark.parametrize(
    ("alias", "name"), [("bf16", "bfloat16"), ("torch.float16", "float16"), ("FP32", "float32")]
)
def test_dtype_aliases(alias: str, name: str) -> None:
    assert profiles.normalize_dtype(alias) == name


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"model_type": "mamba"}, "unsupported model_type 'mamba'"),
        (
            {"model_type": "llama", "hidden_size": 64},
            "num_attention_heads must be a positive integer",
        ),
        ({"model_type": "gpt2", "n_embd": 0}, "n_embd must be a positive integer"),
    ],
)
def test_configs_that_cannot_be_profiled(config: dict[str, object], message: str) -> None:
    with pytest.raises(profiles.ProfileError, match=message):
        profiles.from_config(config)


def test_unknown_dtype_is_refused() -> None:
    config = json.loads((MODELS / "TinyLlama-1.1B" / "config.json").read_text())
    with pytest.raises(profiles.ProfileError, match="unsupported dtype 'int4'"):
        profiles.from_config(config, dtype="int4")


def test_a_tensor_of_unknown_role_is_refused() -> None:
    config = json.loads((MODELS / "TinyLlama-1.1B" / "config.json").read_text())
    header = {"model.vision_tower.weight": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}
    with pytest.raises(profiles.ProfileError, match="vision_tower"):
        profiles.from_safetensors_headers([header], config=config)


@pytest.mark.parametrize(
    "data",
    [
        {"layerBytes": "many"},
        {
            "layerBytes": [1, 2],
            "numLayers": 3,
            "hiddenSize": 8,
            "embedBytes": 0,
            "headBytes": 0,
            "kvBytesPerTokenPerLayer": 0,
            "activationBytes": 2,
            "weightBytesPerParam": 2,
        },
        {
            "layerBytes": [1],
            "hiddenSize": 8,
            "embedBytes": -1,
            "headBytes": 0,
            "kvBytesPerTokenPerLayer": 0,
            "activationBytes": 2,
            "weightBytesPerParam": 2,
        },
        {
            "layerBytes": [1],
            "hiddenSize": 8,
            "embedBytes": 0,
            "headBytes": 0,
            "kvBytesPerTokenPerLayer": 0,
            "activationBytes": 2,
        },
    ],
)
def test_bad_profile_json_is_refused(data: dict[str, object]) -> None:
    with pytest.raises(profiles.ProfileError):
        profiles.ModelProfile.from_dict(data)


# --- bounds: dimensions no real model has are refused before anything is sized by them ---

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 256,
}

out_of_bounds = pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_hidden_layers": 1025}, "num_hidden_layers is 1025, more than the bound of 1,024"),
        ({"num_hidden_layers": 100_000}, "num_hidden_layers is 100000"),
        ({"hidden_size": 131_072, "num_attention_heads": 4}, "hidden_size is 131072"),
        ({"intermediate_size": 2**20}, "intermediate_size is 1048576"),
        ({"vocab_size": 2**20 + 1}, "vocab_size is 1048577"),
        ({"head_dim": 4096}, "head_dim is 4096"),
        ({"num_attention_heads": 128}, r"num_attention_heads \(128\) must divide the hidden size"),
        ({"num_attention_heads": 5}, r"num_attention_heads \(5\) must divide the hidden size"),
        ({"num_key_value_heads": 3}, r"num_key_value_heads \(3\) must divide"),
        ({"num_key_value_heads": 8}, r"num_key_value_heads \(8\) must divide"),
        ({"num_key_value_heads": -1}, "num_key_value_heads must be a positive integer"),
    ],
)


@out_of_bounds
def test_dimensions_out_of_bounds_are_refused(change: dict[str, object], message: str) -> None:
    with pytest.raises(profiles.ProfileError, match=message):
        profiles.from_config({**TINY_LLAMA, **change})


def test_the_bounds_themselves_are_allowed() -> None:
    bounds = profiles.BOUNDS
    profile = profiles.from_config(
        {**TINY_LLAMA, "num_hidden_layers": bounds.max_layers, "vocab_size": bounds.max_vocab}
    )
    assert profile.num_layers == 1024


def test_gpt2_heads_above_the_hidden_size_are_refused() -> None:
    config = {"model_type": "gpt2", "n_embd": 64, "n_head": 65, "n_layer": 2}
    with pytest.raises(profiles.ProfileError, match=r"n_head \(65\) must divide"):
        profiles.from_config({**config, "vocab_size": 256, "n_positions": 128})


def test_safetensors_profiles_are_bounded_too() -> None:
    with pytest.raises(profiles.ProfileError, match="num_hidden_layers is 5000"):
        profiles.from_safetensors_headers([], config={**TINY_LLAMA, "num_hidden_layers": 5000})
