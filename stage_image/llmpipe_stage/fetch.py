"""Download only the files one stage needs from a Hugging Face repository (the pod's
`fetch-model` init container runs `python -m llmpipe_stage.fetch`).

A stage reads its own decoder layers (plus the embeddings on stage 0, the final norm and
LM head on the last stage), so it downloads the safetensors shards that hold those
tensors, as the repository's `model.safetensors.index.json` maps them, `config.json`, and
on stage 0 and the last stage the tokenizer and generation files. Never
`pytorch_model.bin`, `original/*.pth` or anything else: a 70B repository ships the weights
two or three times over, and a stage that needs 1/8 of them should not fetch all of them.

`select_files` is pure (file list + weight map -> names); `main` does the network part with
huggingface_hub, which honours HF_ENDPOINT, HTTPS_PROXY and the other variables the pod's
`spec.runtime.env` sets. Imports no torch: this runs before the stage does.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILES = ("config.json",)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
)
"""What stage 0 (tokenizes, applies the chat template) and the last stage (stop tokens,
generation defaults) read besides the weights; a repository has a subset of them."""
EMBED_KEYS = ("model.embed_tokens.weight",)
HEAD_KEYS = ("model.norm.weight", "lm_head.weight")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class FetchError(RuntimeError):
    """The repository cannot serve this stage (no safetensors weights, tensors missing)."""


def needed_tensors(
    weight_map: Mapping[str, str],
    *,
    layer_start: int,
    layer_end: int,
    has_embedding: bool,
    has_head: bool,
) -> list[str]:
    """The tensor names of layers [layer_start, layer_end) and the stage's ends."""
    wanted = []
    for key in weight_map:
        layer = _LAYER.match(key)
        if layer and layer_start <= int(layer.group(1)) < layer_end:
            wanted.append(key)
    if has_embedding:
        wanted.extend(EMBED_KEYS)
    if has_head:
        wanted.append(HEAD_KEYS[0])
        # tied embeddings: the last stage uses the embedding matrix as its LM head
        wanted.append(HEAD_KEYS[1] if HEAD_KEYS[1] in weight_map else EMBED_KEYS[0])
    missing = [key for key in wanted if key not in weight_map]
    if missing:
        raise FetchError(f"{INDEX_FILE} lacks tensors this stage needs: {missing[:5]}")
    return wanted


def select_files(
    repo_files: Iterable[str],
    weight_map: Mapping[str, str] | None,
    *,
    layer_start: int,
    layer_end: int,
    has_embedding: bool,
    has_head: bool,
) -> list[str]:
    """The repository files this stage downloads, sorted.

    `weight_map` is the index's tensor -> shard map (None when the repository has no
    index: then its top-level `*.safetensors` files, usually one `model.safetensors`).
    """
    available = set(repo_files)
    chosen = {name for name in CONFIG_FILES if name in available}
    if has_embedding or has_head:
        chosen.update(name for name in TOKENIZER_FILES if name in available)
    if weight_map is not None:
        tensors = needed_tensors(
            weight_map,
            layer_start=layer_start,
            layer_end=layer_end,
            has_embedding=has_embedding,
            has_head=has_head,
        )
        chosen.add(INDEX_FILE)
        chosen.update(weight_map[key] for key in tensors)
    else:
        shards = [n for n in available if n.endswith(".safetensors") and "/" not in n]
        if not shards:
            raise FetchError(
                "the repository has no safetensors weights at its top level "
                "(pytorch_model.bin and original/*.pth are not loaded by llmpipe)"
            )
        chosen.update(shards)
    return sorted(chosen)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repo")
    parser.add_argument("revision")
    parser.add_argument("dest", type=Path)
    parser.add_argument("--layer-start", type=int, required=True)
    parser.add_argument("--layer-end", type=int, required=True)
    parser.add_argument("--embedding", action="store_true", help="stage 0: embeddings")
    parser.add_argument("--head", action="store_true", help="last stage: norm + LM head")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from huggingface_hub import HfApi, hf_hub_download

    args = parse_args(sys.argv[1:] if argv is None else argv)
    token = os.environ.get("HF_TOKEN") or None
    api = HfApi()
    files = api.list_repo_files(args.repo, revision=args.revision, token=token)
    weight_map = None
    if INDEX_FILE in files:
        index = hf_hub_download(
            args.repo, INDEX_FILE, revision=args.revision, local_dir=args.dest, token=token
        )
        weight_map = json.loads(Path(index).read_text())["weight_map"]
    try:
        chosen = select_files(
            files,
            weight_map,
            layer_start=args.layer_start,
            layer_end=args.layer_end,
            has_embedding=args.embedding,
            has_head=args.head,
        )
    except FetchError as error:
        print(f"llmpipe fetch: {args.repo}@{args.revision}: {error}", file=sys.stderr)
        return 2
    print(f"llmpipe fetch: {len(chosen)} of {len(files)} files: {', '.join(chosen)}", flush=True)
    for name in chosen:
        hf_hub_download(args.repo, name, revision=args.revision, local_dir=args.dest, token=token)
    return 0


if __name__ == "__main__":
    sys.exit(main())
