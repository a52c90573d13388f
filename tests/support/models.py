"""Model configs the operator tests plan with (configs only: the planner needs no weights)."""

from __future__ import annotations

from typing import Any

# A tiny Llama: about 44 MB of bf16 weights (16 MB embeddings, 16 MB LM head, 1.5 MB per
# decoder layer), so node memory in tens of MiB decides how many stages a plan needs.
TINY_LLAMA_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "num_hidden_layers": 8,
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
}

TINY_DRAFT_CONFIG: dict[str, Any] = {
    **TINY_LLAMA_CONFIG,
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "intermediate_size": 172,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
"""A smaller model of TINY_LLAMA_CONFIG's vocabulary: a draft model for it (spec.model.draft)."""
