"""A tiny demo model made on this machine: random weights and a word-level tokenizer.

`llmpipe serve` with no `--model` writes one here so a newcomer sees tokens stream without
downloading anything. Its output is word salad (the weights are random); the point is the
pipeline. Tests use the same builders for their models of other families.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

SPECIAL = ["<unk>", "<s>", "</s>"]
PUNCTUATION = list(".,!?;:'\"()-")
ROLES = ["system", "user", "assistant"]
WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "it",
    "for",
    "on",
    "with",
    "as",
    "was",
    "at",
    "by",
    "be",
    "this",
    "from",
    "or",
    "are",
    "an",
    "not",
    "have",
    "but",
    "they",
    "his",
    "her",
    "she",
    "he",
    "we",
    "you",
    "i",
    "one",
    "all",
    "their",
    "there",
    "been",
    "has",
    "more",
    "if",
    "will",
    "would",
    "about",
    "which",
    "when",
    "what",
    "so",
    "no",
    "out",
    "up",
    "into",
    "do",
    "can",
    "time",
    "some",
    "could",
    "them",
    "other",
    "than",
    "then",
    "now",
    "only",
    "its",
    "new",
    "two",
    "like",
    "our",
    "first",
    "over",
    "also",
    "after",
    "back",
    "any",
    "these",
    "way",
    "may",
    "well",
    "down",
    "should",
    "because",
    "each",
    "just",
    "those",
    "how",
    "where",
    "most",
    "made",
    "such",
    "while",
    "long",
    "very",
    "still",
    "own",
    "see",
    "here",
    "many",
    "before",
    "why",
    "good",
    "old",
    "great",
    "little",
    "world",
    "life",
    "day",
    "hand",
    "part",
    "place",
    "year",
    "night",
    "light",
    "water",
    "river",
    "stone",
    "tree",
    "forest",
    "mountain",
    "cloud",
    "rain",
    "wind",
    "sea",
    "sky",
    "sun",
    "moon",
    "star",
    "fire",
    "earth",
    "road",
    "city",
    "house",
    "door",
    "window",
    "garden",
    "field",
    "morning",
    "evening",
    "winter",
    "summer",
    "spring",
    "autumn",
    "bird",
    "fish",
    "horse",
    "wolf",
    "fox",
    "cat",
    "dog",
    "song",
    "story",
    "word",
    "book",
    "letter",
    "name",
    "voice",
    "dream",
    "heart",
    "mind",
    "idea",
    "question",
    "answer",
    "reason",
    "number",
    "model",
    "layer",
    "stage",
    "pipeline",
    "token",
    "edge",
    "cloud",
    "node",
    "cluster",
    "memory",
    "network",
    "packet",
    "signal",
    "compute",
    "quiet",
    "bright",
    "dark",
    "warm",
    "cold",
    "soft",
    "loud",
    "slow",
    "fast",
    "small",
    "large",
    "deep",
    "high",
    "near",
    "far",
    "early",
    "late",
    "young",
    "gentle",
    "wild",
    "calm",
    "strange",
    "happy",
    "brave",
    "clever",
    "kind",
    "open",
    "walk",
    "run",
    "sing",
    "read",
    "write",
    "think",
    "know",
    "feel",
    "find",
    "give",
    "take",
    "make",
    "tell",
    "ask",
    "seem",
    "leave",
    "keep",
    "begin",
    "show",
    "hear",
    "play",
    "move",
    "live",
    "believe",
    "bring",
    "happen",
    "carry",
    "follow",
    "learn",
    "change",
    "lead",
    "understand",
    "watch",
    "stop",
    "speak",
    "grow",
    "remember",
    "build",
    "stay",
    "fall",
    "reach",
    "send",
    "rise",
    "turn",
    "wait",
    "always",
    "never",
    "often",
    "sometimes",
    "together",
    "again",
    "almost",
    "across",
    "along",
    "among",
    "around",
    "behind",
    "beyond",
    "toward",
    "under",
    "within",
    "without",
    "hello",
    "hi",
    "thanks",
    "please",
    "yes",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
DEMO_NAME = "llmpipe-demo"


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a fixed vocabulary (lower-cased; unknown words -> <unk>)."""
    vocab_words = list(dict.fromkeys([*SPECIAL, *ROLES, *PUNCTUATION, *WORDS]))
    vocab = {word: index for index, word in enumerate(vocab_words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=core,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<unk>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def demo_config(family: str = "llama", **overrides: Any) -> Any:
    """A small config of `family` sized for a CPU demo; vocabulary = the demo tokenizer's."""
    tokenizer_size = len(build_tokenizer())
    base: dict[str, Any] = {
        "vocab_size": tokenizer_size,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 8,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "initializer_range": 0.08,
        "tie_word_embeddings": False,
    }
    base.update(overrides)
    return AutoConfig.for_model(family, **base)


def write_model(path: Path, *, family: str = "llama", seed: int = 0, **overrides: Any) -> Path:
    """Save a random-weight model of `family` plus the demo tokenizer to `path`."""
    torch.manual_seed(seed)
    config = demo_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
        config, dtype=torch.float32
    )
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def ensure_demo_model(cache_dir: Path) -> Path:
    """The demo model under `cache_dir`, written once (a few seconds) and reused."""
    path = cache_dir / "demo-model-v1"
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return path
    partial = cache_dir / "demo-model-v1.partial"
    write_model(partial)
    partial.rename(path)
    return path
