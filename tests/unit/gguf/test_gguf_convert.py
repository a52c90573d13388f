"""GGUF file -> model directory, on tiny files written by the `gguf` package's writer: the
tensors come back under transformers' names with llama.cpp's query/key permutation undone
(bit-exact for F32 storage), config and tokenizer files from the metadata, one shard per
layer with an index; unsupported architectures and types, truncated and corrupt files fail
naming the file and the tensor; the cache keeps only complete conversions."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file

from llmpipe_stage import gguf_convert, gguf_file
from tests.support import gguf_files

archs = pytest.mark.parametrize("arch", ["llama", "qwen2"])


def load_dir(path: Path) -> dict[str, np.ndarray]:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out: dict[str, np.ndarray] = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(load_file(path / shard))
    assert set(out) == set(index["weight_map"])
    return out


def raw_tensor(path: Path, name: str) -> np.ndarray:
    """A tensor's bytes from a safetensors file as uint16 (numpy has no bfloat16)."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    entry = json.loads(data[8 : 8 + length])[name]
    assert entry["dtype"] == "BF16"
    start, end = entry["data_offsets"]
    return np.frombuffer(data[8 + length + start : 8 + length + end], dtype=np.uint16)


@archs
def test_f32_tensors_come_back_exactly(tmp_path: Path, arch: str) -> None:
    tensors = gguf_files.random_tensors(arch)
    path = gguf_files.write_gguf(tmp_path / "tiny.gguf", tensors, arch=arch)
    gguf_convert.convert(path, tmp_path / "out")
    got = load_dir(tmp_path / "out")
    assert set(got) == set(tensors)
    for name, value in tensors.items():
        assert got[name].dtype == np.float32
        assert np.array_equal(got[name], value), name


def test_quantized_tensors_equal_ggufs_own_dequantization(tmp_path: Path) -> None:
    tensors = gguf_files.random_tensors("llama", tied=True)
    path = gguf_files.write_gguf(tmp_path / "q8.gguf", tensors, quant="Q8_0")
    gguf_convert.convert(path, tmp_path / "out")
    got = load_dir(tmp_path / "out")
    assert "lm_head.weight" not in got
    reader = gguf.GGUFReader(path)
    for tensor in reader.tensors:
        name = next(n for n in tensors if gguf_files.gguf_name(n) == tensor.name)
        reference = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        if tensor.name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = gguf_files.TINY["heads" if "attn_q" in tensor.name else "kv_heads"]
            reference = gguf_convert.unpermute_rotary(reference, heads)
        assert np.array_equal(got[name], reference), name
        # and the quantized weights are close to the originals
        assert np.abs(got[name] - tensors[name]).max() < 0.02


def test_config_tokenizer_and_shards(tmp_path: Path) -> None:
    tensors = gguf_files.random_tensors("llama", tied=True)
    path = gguf_files.write_gguf(tmp_path / "tiny.gguf", tensors)
    out = tmp_path / "out"
    gguf_convert.convert(path, out, dtype="bfloat16")
    config = json.loads((out / "config.json").read_text())
    t = gguf_files.TINY
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == t["layers"]
    assert config["num_attention_heads"] == t["heads"]
    assert config["num_key_value_heads"] == t["kv_heads"]
    assert config["tie_word_embeddings"] is True
    assert config["torch_dtype"] == "bfloat16"
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    layer0 = {index[k] for k in index if k.startswith("model.layers.0.")}
    assert len(layer0) == 1 and index["model.embed_tokens.weight"] not in layer0
    settings = json.loads((out / "tokenizer_config.json").read_text())
    assert settings["chat_template"] == gguf_files.TEMPLATE
    assert settings["eos_token"] == "<|im_end|>"
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = tokenizer.encode("<|im_start|>hi 42").ids
    assert ids[0] == 1  # the control token is matched whole
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hi 42"
    # bfloat16 storage: the float32 values rounded to nearest even
    raw = raw_tensor(out / index["model.norm.weight"], "model.norm.weight")
    widened = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    assert np.abs(widened - tensors["model.norm.weight"]).max() <= 2**-8 * 1.0


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    path = gguf_files.write_gguf(tmp_path / "x.gguf", gguf_files.random_tensors(), arch="phi3")
    with pytest.raises(gguf_file.GgufError, match=r"architecture 'phi3' is not supported"):
        gguf_convert.convert(path, tmp_path / "out")


def test_unsupported_quantization_is_named(tmp_path: Path) -> None:
    tensors = gguf_files.random_tensors()
    path = gguf_files.write_gguf(tmp_path / "x.gguf", tensors)
    writer = gguf.GGUFWriter(str(tmp_path / "q5.gguf"), "llama")
    for key, field in gguf.GGUFReader(path).fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, value)
        else:
            writer.add_key_value(key, value, kind)
    for name, value in tensors.items():
        if name == "model.layers.1.mlp.up_proj.weight":  # 96 x 64: Q5_0 blocks of 32
            raw = np.zeros((value.shape[0], value.shape[1] // 32 * 22), dtype=np.uint8)
            writer.add_tensor(
                gguf_files.gguf_name(name), raw, raw_dtype=gguf.GGMLQuantizationType.Q5_0
            )
        else:
            writer.add_tensor(gguf_files.gguf_name(name), value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(gguf_file.GgufError, match=r"'blk\.1\.ffn_up\.weight' is stored as Q5_0"):
        gguf_convert.convert(tmp_path / "q5.gguf", tmp_path / "out")


def test_truncated_file_names_file_and_tensor(tmp_path: Path) -> None:
    path = gguf_files.write_gguf(tmp_path / "t.gguf", gguf_files.random_tensors())
    data = path.read_bytes()
    header = gguf_file.read_header(path)
    last = max(header.tensors.values(), key=lambda t: t.offset)
    path.write_bytes(data[: last.offset + 10])
    with pytest.raises(gguf_file.GgufError) as error:
        gguf_convert.ensure_converted(path, tmp_path / "cache")
    assert str(path) in str(error.value)
    assert repr(last.name) in str(error.value) and "truncated" in str(error.value)
    # cut inside the metadata: the reader says where it ran out
    path.write_bytes(data[:200])
    with pytest.raises(gguf_file.GgufError, match=r"ends inside metadata"):
        gguf_file.read_header(path)
    assert not any((tmp_path / "cache").glob("*")) if (tmp_path / "cache").exists() else True


def test_corrupt_scales_name_the_tensor(tmp_path: Path) -> None:
    path = gguf_files.write_gguf(tmp_path / "c.gguf", gguf_files.random_tensors(), quant="Q8_0")
    header = gguf_file.read_header(path)
    victim = header.tensors["blk.0.ffn_gate.weight"]
    data = bytearray(path.read_bytes())
    data[victim.offset : victim.offset + 2] = np.float16(np.nan).tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(gguf_file.GgufError, match=r"'blk\.0\.ffn_gate\.weight' \(Q8_0\) holds NaN"):
        gguf_convert.ensure_converted(path, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # nothing half-converted left


def test_not_a_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(gguf_file.GgufError, match="not a GGUF file"):
        gguf_file.read_header(path)


def test_cache_converts_once_per_content(tmp_path: Path) -> None:
    tensors = gguf_files.random_tensors()
    path = gguf_files.write_gguf(tmp_path / "m.gguf", tensors)
    calls: list[str] = []
    first = gguf_convert.ensure_converted(
        path, tmp_path / "cache", progress=lambda what, done, total: calls.append(what)
    )
    assert "converting" in calls
    calls.clear()
    assert (
        gguf_convert.ensure_converted(
            path, tmp_path / "cache", progress=lambda *a: calls.append(a[0])
        )
        == first
    )
    assert "converting" not in calls
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [first.name]
    # other content -> another entry
    other = gguf_files.write_gguf(tmp_path / "m2.gguf", gguf_files.random_tensors(seed=1))
    assert gguf_convert.ensure_converted(other, tmp_path / "cache") != first
