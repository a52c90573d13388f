"""The node probe's layer shape (`--layer-shape`): parsing, its weight bytes and the layers
the product curve runs over. Pure arithmetic, checked against a real Llama layer's tensors."""

from __future__ import annotations

import pytest

from llmpipe_stage import probe


def test_a_shape_parses_from_its_text_and_back() -> None:
    shape = probe.LayerShape.parse("2048,5632,32,4")
    assert shape == probe.LayerShape(hidden=2048, intermediate=5632, heads=32, kv_heads=4)
    assert probe.LayerShape.parse(shape.text()) == shape


@pytest.mark.parametrize(
    "text",
    [
        "512,1408,8",
        "512,1408,8,4,1",
        "512,x,8,4",
        "512,1408,0,4",
        "512,1408,8,3",
        "510,1408,8,4",
        "-512,1408,8,4",
    ],
)
def test_a_malformed_shape_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="layer shape"):
        probe.LayerShape.parse(text)


def test_weight_bytes_are_a_llama_layers_projections() -> None:
    from transformers import LlamaConfig
    from transformers.models.llama import modeling_llama

    shape = probe.LayerShape(hidden=256, intermediate=704, heads=8, kv_heads=2)
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=704,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_hidden_layers=1,
        vocab_size=32,
    )
    layer = modeling_llama.LlamaDecoderLayer(config, layer_idx=0)
    projections = sum(
        p.numel() for name, p in layer.named_parameters() if "proj" in name and "weight" in name
    )
    assert shape.weight_bytes(4) == projections * 4
    assert shape.weight_bytes(2) == projections * 2


def test_the_curve_runs_over_its_working_set_and_at_least_two_layers() -> None:
    small = probe.LayerShape(hidden=512, intermediate=1408, heads=8, kv_heads=4)
    per_layer = small.weight_bytes(4)
    layers = small.layers(4)
    assert layers * per_layer >= probe.PRODUCT_WORKING_SET > (layers - 1) * per_layer
    big = probe.LayerShape(hidden=4096, intermediate=11008, heads=32, kv_heads=32)
    assert big.layers(2) == 2
