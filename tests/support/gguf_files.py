"""Small GGUF files for tests, written with the `gguf` package's writer (an implementation
independent of llmpipe's reader): a tiny Llama or Qwen2 model with a byte-level vocabulary,
its query/key rows permuted the way llama.cpp's converter stores them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

TINY = {
    "layers": 2,
    "hidden": 64,
    "ffn": 96,
    "heads": 4,
    "kv_heads": 2,
    "context": 256,
}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h i", "Ġ hi"]
MERGED = ["hi", "Ġhi"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokens() -> list[str]:
    """The 256 byte-level symbols (printable bytes stand for themselves, others are shifted
    past 255), as GPT-2 style vocabularies spell single bytes."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    symbols = {b: chr(b) for b in keep}
    shift = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + shift)
            shift += 1
    return [symbols[b] for b in range(256)]


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter order: each head's two halves of rows interleaved pairwise."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def random_tensors(
    arch: str = "llama", *, seed: int = 0, tied: bool = False
) -> dict[str, np.ndarray]:
    """transformers-named float32 tensors of the tiny model."""
    rng = np.random.default_rng(seed)
    t = TINY
    vocab = len(SPECIALS) + 256 + len(MERGED)
    head_dim = t["hidden"] // t["heads"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, t["hidden"])}
    shapes["model.norm.weight"] = (t["hidden"],)
    if not tied:
        shapes["lm_head.weight"] = (vocab, t["hidden"])
    for i in range(t["layers"]):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (t["hidden"],)
        shapes[p + "post_attention_layernorm.weight"] = (t["hidden"],)
        shapes[p + "self_attn.q_proj.weight"] = (t["heads"] * head_dim, t["hidden"])
        shapes[p + "self_attn.k_proj.weight"] = (t["kv_heads"] * head_dim, t["hidden"])
        shapes[p + "self_attn.v_proj.weight"] = (t["kv_heads"] * head_dim, t["hidden"])
        shapes[p + "self_attn.o_proj.weight"] = (t["hidden"], t["heads"] * head_dim)
        shapes[p + "mlp.gate_proj.weight"] = (t["ffn"], t["hidden"])
        shapes[p + "mlp.up_proj.weight"] = (t["ffn"], t["hidden"])
        shapes[p + "mlp.down_proj.weight"] = (t["hidden"], t["ffn"])
        if arch == "qwen2":
            for proj, rows in (("q", t["heads"]), ("k", t["kv_heads"]), ("v", t["kv_heads"])):
                shapes[p + f"self_attn.{proj}_proj.bias"] = (rows * head_dim,)
    return {k: (rng.standard_normal(s) * 0.2).astype(np.float32) for k, s in shapes.items()}


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(name: str) -> str:
    if name in GGUF_NAMES:
        return GGUF_NAMES[name]
    _, _, index, rest = name.split(".", 3)
    return f"blk.{index}.{GGUF_NAMES[rest]}"


def write_gguf(
    path: Path,
    tensors: dict[str, np.ndarray],
    *,
    arch: str = "llama",
    quant: str = "F32",
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write the tiny model as GGUF; 2-D weights stored as `quant`, norms and biases as F32."""
    import gguf

    t = TINY
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(t["layers"])
    writer.add_context_length(t["context"])
    writer.add_embedding_length(t["hidden"])
    writer.add_feed_forward_length(t["ffn"])
    writer.add_head_count(t["heads"])
    writer.add_head_count_kv(t["kv_heads"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list([*SPECIALS, *byte_tokens(), *MERGED])
    writer.add_token_types([3] * len(SPECIALS) + [1] * (256 + len(MERGED)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(TEMPLATE)
    for key, value in (metadata or {}).items():
        writer.add_string(key, value) if isinstance(value, str) else writer.add_uint32(key, value)
    qtype = gguf.GGMLQuantizationType[quant]
    for name, value in tensors.items():
        stored = value
        if arch == "llama" and ("q_proj.weight" in name or "k_proj.weight" in name):
            heads = t["heads"] if "q_proj" in name else t["kv_heads"]
            stored = llama_cpp_permute(value, heads)
        if value.ndim == 2 and quant != "F32":
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(stored, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name(name), np.ascontiguousarray(stored))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
