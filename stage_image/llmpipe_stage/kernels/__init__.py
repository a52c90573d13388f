"""llmpipe's own decode-step product kernel (`small_linear.cpp`), built once and cached.

`small_linear(x, w, scales, bias)` computes x W^T for 1 to 8 activation rows at the speed
the weights can be read (bf16 through AVX512_BF16 dot products, weight-only int8 with
per-row scales, float32 through FMA); decode.py routes decode-sized products to it and
keeps oneDNN/torch for prompts.

Where the library comes from, first found wins:
1. `$LLMPIPE_KERNEL_DIR/<name>.so` or the cache `~/.cache/llmpipe/kernels/<name>.so`, where
   <name> carries a hash of the source, torch's version and the compiler flags (the stage
   image builds it there at image build time, so a pod needs no compiler);
2. compiled on first use into the cache (torch.utils.cpp_extension with ninja, about half a
   minute on one core; a line says so before it starts);
3. none: the CPU lacks the instructions (AVX-512 F/BW/VL and AVX512_BF16, read from
   /proc/cpuinfo), no compiler is found, or the build fails; decode then runs torch's
   products. `status()` says which, and the stage logs it once.

`LLMPIPE_KERNEL=off` turns the kernel off (the torch path, e.g. to compare).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import threading
from pathlib import Path

import torch

from llmpipe_stage import cpu

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("small_linear.cpp")
FLAGS = ("-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma")
"""Compiler flags. `-fopenmp` is what makes `at::parallel_for` in the source parallel: ATen's
header runs the body serially unless the extension itself is built with OpenMP (the
library then links the libgomp that torch already loaded, one thread pool for both)."""
LDFLAGS = ("-fopenmp",)
REQUIRED_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_bf16"})
MAX_ROWS = 8
MAX_HEAD_DIM = 512

_lock = threading.Lock()
_state: dict[str, str] = {}


def library_name() -> str:
    """The library's file stem: the content hash of what it is built from."""
    digest = hashlib.sha256()
    digest.update(SOURCE.read_bytes())
    digest.update(torch.__version__.encode())
    digest.update(" ".join(FLAGS + LDFLAGS).encode())
    return f"llmpipe_kernels_{digest.hexdigest()[:16]}"


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmpipe" / "kernels"


def search_dirs() -> list[Path]:
    dirs = [Path(d) for d in [os.environ.get("LLMPIPE_KERNEL_DIR", "")] if d]
    return [*dirs, cache_dir()]


def cpu_supported(cpuinfo: str | None = None) -> bool:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    return cpu.cpu_flags(cpuinfo) >= REQUIRED_FLAGS


def build(directory: Path) -> Path:
    """Compile the library into `directory` (blocking), load it into this process and
    return the cached file's path."""
    from torch.utils import cpp_extension  # heavy import, only when compiling

    name = library_name()
    build_dir = directory / f"{name}.build"
    build_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"llmpipe: compiling the decode kernel (once, about 15-60 s) into {directory}",
        file=sys.stderr,
        flush=True,
    )
    cpp_extension.load(
        name=name,
        sources=[str(SOURCE)],
        extra_cflags=list(FLAGS),
        extra_ldflags=list(LDFLAGS),
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )
    built = build_dir / f"{name}.so"
    target = directory / f"{name}.so"
    tmp = directory / f".{name}.so.{os.getpid()}"
    shutil.copyfile(built, tmp)
    tmp.replace(target)  # atomic: a concurrent loader sees the whole file or none
    return target


def _load() -> str:
    if os.environ.get("LLMPIPE_KERNEL", "") == "off":
        return "off (LLMPIPE_KERNEL=off): torch products"
    if not cpu_supported():
        return "off (the CPU lacks AVX-512 F/BW/VL + AVX512_BF16): torch products"
    name = library_name()
    for directory in search_dirs():
        path = directory / f"{name}.so"
        if path.is_file():
            torch.ops.load_library(str(path))  # type: ignore[no-untyped-call]
            return f"on ({path})"
    if shutil.which(os.environ.get("CXX", "c++")) is None or shutil.which("ninja") is None:
        return "off (no prebuilt kernel and no C++ compiler or ninja to build it): torch products"
    try:
        path = build(cache_dir())
    except (RuntimeError, OSError, ImportError) as error:  # the torch path still works
        lines = [line for line in str(error).splitlines() if "error" in line] or [str(error)]
        return f"off (building the kernel failed: {lines[-1][:300]}): torch products"
    return f"on ({path}, built now)"


def available() -> bool:
    """Whether `small_linear` runs here (loads or builds the library on first call)."""
    return status().startswith("on")


def status() -> str:
    """Which product path decode runs, in words (logged once per process)."""
    with _lock:
        if "status" not in _state:
            _state["status"] = _load()
            log.info("decode product kernel: %s", _state["status"])
        return _state["status"]


def small_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M <= 8, K] times weight [N, K]^T (int8 weight: times scales [N]) plus bias [N]."""
    y: torch.Tensor = torch.ops.llmpipe.small_linear(x, weight, scales, bias)
    return y


def stream_read(t: torch.Tensor) -> float:
    """Reads all of contiguous `t` with vector loads on torch's threads (a bandwidth probe:
    bench/kernel.py times it beside the products)."""
    value: float = torch.ops.llmpipe.stream_read(t)
    return value


Product = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]
"""A projection as `decode_layer` takes it: weight [N, K] (plain layout; int8 or the
activation dtype), float32 scales [N] (int8 only) or None, float32 bias [N] or None."""


def decode_layer(
    x: torch.Tensor,
    input_norm: tuple[torch.Tensor, float],
    attention: list[Product],
    post_norm: tuple[torch.Tensor, float],
    mlp: list[Product],
    *,
    pool: tuple[torch.Tensor, torch.Tensor, int],
    slots: torch.Tensor,
    positions: torch.Tensor,
    rotary: tuple[torch.Tensor, torch.Tensor],
    heads: tuple[int, int, int],
    scaling: float,
) -> torch.Tensor:
    """One Llama-style decoder layer's decode step in one call (small_linear.cpp,
    `decode_layer`): x [M <= 8, hidden] -> [M, hidden]. attention: q|k|v and o; mlp:
    gate|up and down; pool: (keys, values [layers, slots, kv_heads, context, head_dim], the
    layer's index), written at (slots[m], positions[m]); rotary: cos, sin [M, head_dim];
    heads: (query heads, kv heads, head_dim)."""
    (qkv, qkv_s, qkv_b), (o, o_s, o_b) = attention
    (gu, gu_s, gu_b), (d, d_s, d_b) = mlp
    keys, values, layer = pool
    y: torch.Tensor = torch.ops.llmpipe.decode_layer(
        x, input_norm[0], input_norm[1], qkv, qkv_s, qkv_b, o, o_s, o_b,
        post_norm[0], post_norm[1], gu, gu_s, gu_b, d, d_s, d_b,
        keys, values, layer, slots, positions, rotary[0], rotary[1], *heads, scaling,
    )  # fmt: skip
    return y
