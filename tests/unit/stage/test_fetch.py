"""Which files a stage's init container downloads from a Hugging Face repository: its
shards by the safetensors index, config everywhere, tokenizer files on the end stages,
never the duplicate PyTorch weights; and the refusals when the repository cannot serve.
(Pure: `llmpipe_stage.fetch.select_files` imports neither torch nor huggingface_hub.)"""

from __future__ import annotations

import pytest

from llmpipe_stage import fetch

# a 4-layer Llama repository as the Hub serves it: 2 shards (layer 1 split across them),
# the original .pth weights and a .bin copy beside them
WEIGHT_MAP = {
    "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
    **{f"model.layers.0.{t}": "model-00001-of-00002.safetensors" for t in ("mlp.up", "attn.q")},
    "model.layers.1.mlp.up": "model-00001-of-00002.safetensors",
    "model.layers.1.attn.q": "model-00002-of-00002.safetensors",
    **{
        f"model.layers.{i}.{t}": "model-00002-of-00002.safetensors"
        for i in (2, 3)
        for t in ("mlp.up", "attn.q")
    },
    "model.norm.weight": "model-00002-of-00002.safetensors",
    "lm_head.weight": "model-00002-of-00002.safetensors",
}
REPO = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "model.safetensors.index.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "pytorch_model.bin",
    "original/consolidated.00.pth",
    "original/params.json",
    "README.md",
]
TOKENIZER = {
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
}
INDEX_AND_CONFIG = {"config.json", "model.safetensors.index.json"}
SHARD_1, SHARD_2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"

stages = pytest.mark.parametrize(
    ("start", "end", "embedding", "head", "expected"),
    [
        (0, 1, True, False, INDEX_AND_CONFIG | TOKENIZER | {SHARD_1}),  # stage 0
        (1, 2, False, False, INDEX_AND_CONFIG | {SHARD_1, SHARD_2}),  # layer 1 spans both
        (2, 3, False, False, INDEX_AND_CONFIG | {SHARD_2}),  # a middle stage: no tokenizer
        (3, 4, False, True, INDEX_AND_CONFIG | TOKENIZER | {SHARD_2}),  # last stage
        (0, 4, True, True, INDEX_AND_CONFIG | TOKENIZER | {SHARD_1, SHARD_2}),  # one stage
    ],
)


@stages
def test_a_stage_downloads_its_shards_and_what_its_end_needs(
    start: int, end: int, embedding: bool, head: bool, expected: set[str]
) -> None:
    chosen = fetch.select_files(
        REPO, WEIGHT_MAP, layer_start=start, layer_end=end, has_embedding=embedding, has_head=head
    )
    assert set(chosen) == expected
    assert chosen == sorted(chosen)
    assert not any(n.endswith((".bin", ".pth")) or n.startswith("original/") for n in chosen)


def test_tied_embeddings_put_the_embedding_shard_on_the_last_stage() -> None:
    tied = {k: v for k, v in WEIGHT_MAP.items() if k != "lm_head.weight"}
    chosen = fetch.select_files(
        REPO, tied, layer_start=3, layer_end=4, has_embedding=False, has_head=True
    )
    assert SHARD_1 in chosen  # the embedding matrix serves as the LM head


def test_without_an_index_the_top_level_safetensors_files_are_fetched() -> None:
    repo = ["config.json", "model.safetensors", "pytorch_model.bin", "original/x.safetensors"]
    chosen = fetch.select_files(
        repo, None, layer_start=1, layer_end=2, has_embedding=False, has_head=False
    )
    assert chosen == ["config.json", "model.safetensors"]


def test_a_repository_with_only_pytorch_weights_is_refused() -> None:
    with pytest.raises(fetch.FetchError, match="no safetensors weights"):
        fetch.select_files(
            ["config.json", "pytorch_model.bin"],
            None,
            layer_start=0,
            layer_end=1,
            has_embedding=True,
            has_head=True,
        )


def test_an_index_missing_the_stage_tensors_is_refused() -> None:
    partial = {k: v for k, v in WEIGHT_MAP.items() if k != "model.norm.weight"}
    with pytest.raises(fetch.FetchError, match=r"model\.norm\.weight"):
        fetch.select_files(
            REPO, partial, layer_start=3, layer_end=4, has_embedding=False, has_head=True
        )


def test_the_command_line_matches_what_the_operator_renders() -> None:
    args = fetch.parse_args(
        ["org/m", "abc", "/models/model", "--layer-start", "2", "--layer-end", "5", "--head"]
    )
    assert (args.repo, args.revision, str(args.dest)) == ("org/m", "abc", "/models/model")
    assert (args.layer_start, args.layer_end, args.embedding, args.head) == (2, 5, False, True)
