"""GGUF file -> a standard model directory the stages load like any other.

`python -m llmpipe_stage.gguf_convert FILE.gguf --out DIR` (the stage's init container) or
`ensure_converted(FILE, cache_dir)` (`llmpipe serve --model FILE.gguf`, the tests) writes:
config.json and generation_config.json from the GGUF metadata; tokenizer.json (a byte-level
BPE tokenizer built from the GGUF vocabulary and merges), tokenizer_config.json (special
tokens, chat template); and the dequantized weights as safetensors under the transformers
tensor names, one shard per decoder layer plus one for the embeddings (and one for an untied
head) with an index, so a stage reads only its own shards.

Llama GGUFs store the query and key projections permuted for llama.cpp's rotary layout
(the two halves of each head interleaved); the conversion undoes that so the weights equal
the original checkpoint's. Conversion writes into a temporary directory and renames it into
place when complete, so a crash or Ctrl-C leaves nothing half-converted; the cache is keyed
by the file's content hash. File I/O and computation only: it serves nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from llmpipe_stage import gguf_file
from llmpipe_stage.gguf_file import Floats, GgufError, GgufHeader

CONVERTER_VERSION = 1
"""Part of the cache key: bump it when the output of a conversion changes."""
TOKENIZER_MODELS = ("gpt2",)
DTYPES = {"float32": ("F32", 4), "float16": ("F16", 2), "bfloat16": ("BF16", 2)}
COMPLETE_MARK = ".complete"

# GGUF tensor name (after "blk.N.") -> transformers name (after "model.layers.N.")
LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# Pre-tokenizer regexes by GGUF `tokenizer.ggml.pre` (how the text is split before BPE).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = ("default", "gpt2", "smollm", "starcoder", "refact", "llama-bpe", "qwen2")

Progress = Callable[[str, int, int], None]
"""progress(what, done, total): what is "hashing" (bytes) or "converting" (tensors)."""


@dataclass(frozen=True)
class Shard:
    filename: str
    tensors: list[tuple[str, str]]  # (GGUF name, transformers name)


# -- tensors -----------------------------------------------------------------------------------
def transformers_name(gguf_name: str, *, path: Path) -> str:
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_TENSORS:
        return f"model.layers.{int(parts[1])}.{LAYER_TENSORS[parts[2]]}"
    raise GgufError(f"{path}: tensor {gguf_name!r} has no place in the model (unknown name)")


def unpermute_rotary(weight: Floats, heads: int) -> Floats:
    """Undo llama.cpp's query/key row order. weight: [heads * head_dim, in] (or [heads * head_dim]
    for a bias). llama.cpp stores each head's rows as pairs (row i, row i + head_dim/2)
    interleaved; transformers keeps the first half of a head's rows, then the second."""
    rows = weight.shape[0]
    half = rows // heads // 2
    # stored: [heads, half, 2, ...] (pairs interleaved) -> original: [heads, 2, half, ...]
    grouped = weight.reshape(heads, half, 2, *weight.shape[1:])
    restored: Floats = np.ascontiguousarray(grouped.swapaxes(1, 2)).reshape(weight.shape)
    return restored


def _to_dtype(values: Floats, dtype: str) -> np.ndarray[Any, Any]:
    if dtype == "float32":
        return values
    if dtype == "float16":
        return values.astype(np.float16)
    # bfloat16 = the top 16 bits of float32, rounded to nearest even (as torch does).
    bits = values.view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
    return rounded.astype(np.uint16)


def plan_shards(header: GgufHeader, config: dict[str, Any]) -> list[Shard]:
    """One shard for the embeddings, one per decoder layer, one for the norm and head."""
    path = header.path
    layers: dict[int, list[tuple[str, str]]] = {}
    embed: list[tuple[str, str]] = []
    head: list[tuple[str, str]] = []
    for name in header.tensors:
        target = transformers_name(name, path=path)
        if target.startswith("model.layers."):
            layers.setdefault(int(target.split(".")[2]), []).append((name, target))
        elif target == "model.embed_tokens.weight":
            embed.append((name, target))
        else:
            head.append((name, target))
    count = int(config["num_hidden_layers"])
    for key in ("token_embd.weight", "output_norm.weight"):
        if key not in header.tensors:
            raise GgufError(f"{path}: tensor {key!r} is missing")
    if sorted(layers) != list(range(count)):
        raise GgufError(
            f"{path}: the file has tensors for layers {sorted(layers)[:5]}..., not 0..{count - 1}"
        )
    groups = [embed, *(layers[i] for i in range(count)), head]
    total = len(groups)
    return [
        Shard(f"model-{i + 1:05d}-of-{total:05d}.safetensors", sorted(group, key=lambda t: t[1]))
        for i, group in enumerate(groups)
    ]


def converted_tensor(reader: gguf_file.TensorReader, name: str, config: dict[str, Any]) -> Floats:
    values = reader.tensor(name)
    if config["model_type"] == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
        key = "num_attention_heads" if "attn_q" in name else "num_key_value_heads"
        values = unpermute_rotary(values, int(config[key]))
    return values


def write_shard(
    file: BinaryIO,
    shard: Shard,
    header: GgufHeader,
    reader: gguf_file.TensorReader,
    *,
    config: dict[str, Any],
    dtype: str,
    on_tensor: Callable[[], None],
) -> dict[str, int]:
    """Write one safetensors file, one tensor at a time (the header first: shapes are known)."""
    code, itemsize = DTYPES[dtype]
    entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, target in shard.tensors:
        info = header.tensors[name]
        size = info.numel * itemsize
        entries[target] = {
            "dtype": code,
            "shape": list(info.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    file.write(len(raw).to_bytes(8, "little") + raw)
    for name, _ in shard.tensors:
        file.write(_to_dtype(converted_tensor(reader, name, config), dtype).tobytes())
        on_tensor()
    return {target: offset for _, target in shard.tensors}


# -- tokenizer ---------------------------------------------------------------------------------
def _pre_tokenizer(kind: str) -> Any:
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind in ("default", "gpt2"):
        return byte_level
    if kind in ("smollm", "starcoder", "refact"):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    split = _LLAMA3_SPLIT if kind == "llama-bpe" else _QWEN2_SPLIT
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def check_tokenizer(header: GgufHeader) -> None:
    model = header.get("tokenizer.ggml.model")
    if model not in TOKENIZER_MODELS:
        raise GgufError(
            f"{header.path}: tokenizer model {model!r} is not supported (byte-level BPE, "
            f"'gpt2', is; SentencePiece 'llama' tokenizers are not yet)"
        )
    pre = header.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise GgufError(
            f"{header.path}: pre-tokenizer {pre!r} is not supported; supported: "
            f"{', '.join(PRE_TOKENIZERS)}"
        )


def write_tokenizer(header: GgufHeader, out: Path, *, config: dict[str, Any]) -> None:
    """tokenizer.json (BPE from the GGUF vocabulary and merges) and tokenizer_config.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    check_tokenizer(header)
    tokens: list[str] = list(gguf_file.required(header, "tokenizer.ggml.tokens"))
    types: list[int] = list(header.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = []
    for line in gguf_file.required(header, "tokenizer.ggml.merges"):
        pair = line.split(" ")
        if len(pair) != 2:
            raise GgufError(f"{header.path}: merge {line!r} is not two tokens")
        merges.append((pair[0], pair[1]))
    tokenizer = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    )
    tokenizer.pre_tokenizer = _pre_tokenizer(header.get("tokenizer.ggml.pre", "default"))
    tokenizer.decoder = decoders.ByteLevel()
    add_bos = bool(header.get("tokenizer.ggml.add_bos_token", False))
    bos_id = config.get("bos_token_id")
    if add_bos and bos_id is not None:
        bos = tokens[bos_id]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    # Control tokens (type 3) are special; user-defined ones (4) are matched whole too.
    tokenizer.add_special_tokens(
        [
            AddedToken(tokens[i], special=True, normalized=False)
            for i, t in enumerate(types)
            if t == 3
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(types)
            if t == 4
        ]
    )
    tokenizer.save(str(out / "tokenizer.json"))
    settings: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    for field, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "pad_token_id")):
        if config.get(key) is not None:
            settings[f"{field}_token"] = tokens[config[key]]
    unk = header.get("tokenizer.ggml.unknown_token_id")
    if unk is not None:
        settings["unk_token"] = tokens[int(unk)]
    template = header.get("tokenizer.chat_template")
    if template:
        settings["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))


# -- the whole conversion ----------------------------------------------------------------------
def check_supported(header: GgufHeader) -> None:
    """Refuse early (before any writing) what the conversion cannot do, naming it."""
    gguf_file.architecture(header)
    check_tokenizer(header)
    for info in header.tensors.values():
        gguf_file.quant_of(info, path=header.path)


def convert(
    path: Path, out: Path, *, dtype: str = "float32", progress: Progress | None = None
) -> None:
    """Write the model directory for `path` into the (new or empty) directory `out`."""
    header = gguf_file.read_header(path)
    check_supported(header)
    config = gguf_file.model_config(header, dtype=dtype)
    shards = plan_shards(header, config)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    generation = {
        k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    write_tokenizer(header, out, config=config)
    total = sum(len(s.tensors) for s in shards)
    done = 0

    def on_tensor() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress("converting", done, total)

    weight_map: dict[str, str] = {}
    total_size = 0
    with gguf_file.TensorReader(header) as reader:
        for shard in shards:
            with (out / shard.filename).open("wb") as file:
                sizes = write_shard(
                    file, shard, header, reader, config=config, dtype=dtype, on_tensor=on_tensor
                )
            weight_map.update(dict.fromkeys(sizes, shard.filename))
            total_size += sum(header.tensors[n].numel * DTYPES[dtype][1] for n, _ in shard.tensors)
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def file_digest(path: Path, *, progress: Progress | None = None) -> str:
    digest = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with path.open("rb") as file:
        while chunk := file.read(1 << 22):
            digest.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress("hashing", done, total)
    return digest.hexdigest()


@contextlib.contextmanager
def staging(final: Path) -> Iterator[Path]:
    """A temporary sibling of `final`, renamed to it on success and removed on any failure."""
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield temp
        (temp / COMPLETE_MARK).write_text("")
        try:
            os.rename(temp, final)
        except OSError:
            if not (final / COMPLETE_MARK).is_file():
                raise
            shutil.rmtree(temp)  # another process finished the same conversion first
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def ensure_converted(
    path: Path, cache_dir: Path, *, dtype: str = "float32", progress: Progress | None = None
) -> Path:
    """The converted model directory for `path`, converting once per content hash and dtype."""
    if dtype not in DTYPES:
        raise GgufError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if not path.is_file():
        raise GgufError(f"{path}: no such file")
    digest = file_digest(path, progress=progress)
    final = cache_dir / f"{path.stem}-{digest[:16]}-{dtype}-v{CONVERTER_VERSION}"
    if (final / COMPLETE_MARK).is_file():
        return final
    check_supported(gguf_file.read_header(path))
    with staging(final) as temp:
        convert(path, temp, dtype=dtype, progress=progress)
    return final


# -- command line ------------------------------------------------------------------------------
class ProgressPrinter:
    """Prints a progress line to stderr at every tenth of each phase (hashing, converting;
    hashing a file under 1 GiB only at its start and end)."""

    def __init__(self, *, prefix: str = "  ") -> None:
        self.prefix = prefix
        self.shown: dict[str, int] = {}

    def __call__(self, what: str, done: int, total: int) -> None:
        # Hashing a small file takes a moment: only its start and end are worth a line.
        steps = 10 if what != "hashing" or total >= 2**30 else 1
        tenth = steps * done // max(1, total) * (10 // steps)
        if self.shown.get(what) == tenth:
            return
        self.shown[what] = tenth
        unit = "MiB" if what == "hashing" else "tensors"
        scale = 2**20 if what == "hashing" else 1
        print(
            f"{self.prefix}{what}: {10 * tenth:3d}% ({done // scale}/{total // scale} {unit})",
            file=sys.stderr,
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llmpipe_stage.gguf_convert",
        description="Convert a GGUF file into a model directory (config, tokenizer, safetensors).",
    )
    parser.add_argument("file", type=Path, help="the .gguf file")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", type=Path, help="write the model directory here (must not exist)")
    target.add_argument(
        "--cache", type=Path, help="convert into this cache (once per content hash)"
    )
    target.add_argument("--print-config", action="store_true", help="print config.json and exit")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = parser.parse_args(argv)
    try:
        if args.print_config:
            header = gguf_file.read_header(args.file)
            print(json.dumps(gguf_file.model_config(header, dtype=args.dtype), indent=2))
            return 0
        if args.out is not None:
            if args.out.exists() and any(args.out.iterdir()):
                print(f"gguf_convert: {args.out} exists and is not empty", file=sys.stderr)
                return 2
            if args.out.exists():
                args.out.rmdir()  # staging renames a complete directory into its place
            check_supported(gguf_file.read_header(args.file))
            with staging(args.out) as temp:
                convert(args.file, temp, dtype=args.dtype, progress=ProgressPrinter())
            print(args.out)
            return 0
        print(ensure_converted(args.file, args.cache, dtype=args.dtype, progress=ProgressPrinter()))
        return 0
    except GgufError as error:
        print(f"gguf_convert: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
