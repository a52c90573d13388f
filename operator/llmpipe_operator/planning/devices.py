"""GPU facts of a node: NVIDIA GPU Feature Discovery labels and a table of known products.

GPU Feature Discovery (GFD, part of the NVIDIA GPU Operator and of the device plugin's
Helm chart) labels a node with `nvidia.com/gpu.count`, `nvidia.com/gpu.memory` (MiB per
GPU) and `nvidia.com/gpu.product`; the device plugin advertises `nvidia.com/gpu` in
`status.allocatable`. `read_gpu` turns those into a `Gpu`: how many GPUs a stage may take,
the memory of one, its dense fp16 TFLOP/s and memory bandwidth (the `llmpipe.io/tflops` and
`llmpipe.io/memory-bandwidth-gbps` labels win over the product table), whether it runs
bfloat16, and whether its memory is the host's (Jetson-class boards: one budget, not two).

The live inventory (`planning.live`) and the cluster file (`planning.inventory`) both call
`read_gpu` on the node's labels, so `llmpipe plan --cluster` sees a file node exactly as
the operator sees a live one. Pure: mappings in, dataclasses out.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Literal

LABEL_GPU_COUNT = "nvidia.com/gpu.count"
LABEL_GPU_MEMORY = "nvidia.com/gpu.memory"
"""MiB per GPU, as GFD writes it."""
LABEL_GPU_PRODUCT = "nvidia.com/gpu.product"
LABEL_UNIFIED_MEMORY = "llmpipe.io/unified-memory"
"""`true` / `false`: override the product table's answer (a board GFD names oddly)."""
RESOURCE_GPU = "nvidia.com/gpu"
"""The device plugin's extended resource: what a GPU stage requests (limits) and what
`status.allocatable` says the node can give."""

Device = Literal["auto", "cpu", "cuda"]
DEVICES: tuple[Device, ...] = ("auto", "cpu", "cuda")
DTYPE_AUTO = "auto"


class DeviceError(ValueError):
    """A GPU label that cannot be read; the message names the node and the label."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Product:
    """Spec-sheet figures of one GPU product (peak dense fp16 tensor math, no sparsity)."""

    name: str
    patterns: tuple[tuple[str, ...], ...]
    """Runs of words (`tokens`) of `nvidia.com/gpu.product` that name this product; the
    first product in table order with a matching run wins, so longer names come first."""
    tflops: float
    memory_bandwidth_gbps: float
    memory_mib: int
    bf16: bool
    """Compute capability 8.0 or newer (Ampere and later) runs bfloat16 natively."""
    unified: bool = False
    """The GPU shares the board's LPDDR memory with the CPU (Jetson)."""


# Each figure is the product's public spec sheet, dense (not "with sparsity") fp16 tensor
# TFLOP/s, memory bandwidth in GB/s and memory in MiB. Where a sheet quotes only sparse
# figures, dense is half; where a Jetson sheet quotes only sparse INT8 TOPS for the GPU,
# dense fp16 is a quarter (Ampere tensor cores: sparse = 2x dense, INT8 = 2x FP16), which
# equals SMs x 4 tensor cores x 256 FMA/clock x 2 x the GPU clock.
PRODUCTS: tuple[Product, ...] = (
    # Jetson AGX Orin Series Technical Brief v1.2 (NVIDIA, 2023), table 1: AGX Orin 32GB
    # GPU 108 sparse INT8 TOPS (1792 cores, 56 tensor cores, 930 MHz), 204.8 GB/s LPDDR5.
    Product(
        name="Jetson AGX Orin 32GB",
        patterns=(("agx", "orin", "32gb"),),
        tflops=27.0,
        memory_bandwidth_gbps=204.8,
        memory_mib=32768,
        bf16=True,
        unified=True,
    ),
    # Same brief: AGX Orin 64GB GPU 170 sparse INT8 TOPS (2048 cores, 64 tensor cores,
    # 1.3 GHz), 204.8 GB/s. Any other AGX Orin label plans as this one.
    Product(
        name="Jetson AGX Orin 64GB",
        patterns=(("agx", "orin"),),
        tflops=42.5,
        memory_bandwidth_gbps=204.8,
        memory_mib=65536,
        bf16=True,
        unified=True,
    ),
    # Jetson Orin NX Series datasheet (DS-10712-001): Orin NX 16GB GPU 1024 cores, 32 TCs
    # at 918 MHz (8 SMs x 4 x 256 x 2 x 0.918 GHz = 15.0 dense fp16 TFLOP/s), 102.4 GB/s.
    Product(
        name="Jetson Orin NX 16GB",
        patterns=(("orin", "nx"),),
        tflops=15.0,
        memory_bandwidth_gbps=102.4,
        memory_mib=16384,
        bf16=True,
        unified=True,
    ),
    # Jetson Orin Nano Super Developer Kit datasheet (NVIDIA, Dec 2024): 67 sparse INT8
    # TOPS (1024 cores, 32 TCs, 1020 MHz), 102 GB/s LPDDR5, 8 GB. The original Orin Nano
    # (40 TOPS, 68 GB/s) is the same board at lower clocks: label it to plan for that.
    Product(
        name="Jetson Orin Nano 8GB",
        patterns=(("orin", "nano"),),
        tflops=16.75,
        memory_bandwidth_gbps=102.0,
        memory_mib=8192,
        bf16=True,
        unified=True,
    ),
    # NVIDIA H200 Tensor Core GPU datasheet: H200 SXM FP16 tensor 1,979 TFLOPS with
    # sparsity, 4.8 TB/s, 141 GB HBM3e.
    Product(
        name="H200",
        patterns=(("h200",),),
        tflops=989.5,
        memory_bandwidth_gbps=4800.0,
        memory_mib=144384,
        bf16=True,
    ),
    # NVIDIA H100 Tensor Core GPU datasheet: H100 PCIe FP16 tensor 1,513 TFLOPS with
    # sparsity, 2 TB/s, 80 GB.
    Product(
        name="H100 PCIe",
        patterns=(("h100", "pcie"),),
        tflops=756.5,
        memory_bandwidth_gbps=2000.0,
        memory_mib=81920,
        bf16=True,
    ),
    # Same datasheet: H100 SXM FP16 tensor 1,979 TFLOPS with sparsity, 3.35 TB/s, 80 GB.
    Product(
        name="H100 SXM",
        patterns=(("h100",),),
        tflops=989.5,
        memory_bandwidth_gbps=3350.0,
        memory_mib=81920,
        bf16=True,
    ),
    # NVIDIA A100 Tensor Core GPU datasheet: FP16 tensor 312 TFLOPS (dense); 80GB SXM
    # 2,039 GB/s, 80GB PCIe 1,935 GB/s, 40GB 1,555 GB/s.
    Product(
        name="A100 80GB SXM",
        patterns=(("a100", "sxm4", "80gb"), ("a100", "sxm", "80gb")),
        tflops=312.0,
        memory_bandwidth_gbps=2039.0,
        memory_mib=81920,
        bf16=True,
    ),
    # (A100 datasheet, as above: 80GB PCIe.)
    Product(
        name="A100 80GB PCIe",
        patterns=(("a100", "80gb"), ("a100", "pcie", "80gb")),
        tflops=312.0,
        memory_bandwidth_gbps=1935.0,
        memory_mib=81920,
        bf16=True,
    ),
    # (A100 datasheet, as above: 40GB, SXM or PCIe.)
    Product(
        name="A100 40GB",
        patterns=(("a100",),),
        tflops=312.0,
        memory_bandwidth_gbps=1555.0,
        memory_mib=40960,
        bf16=True,
    ),
    # NVIDIA A10 Tensor Core GPU datasheet: FP16 tensor 125 TFLOPS (250 with sparsity),
    # 600 GB/s, 24 GB GDDR6.
    Product(
        name="A10",
        patterns=(("a10",),),
        tflops=125.0,
        memory_bandwidth_gbps=600.0,
        memory_mib=24576,
        bf16=True,
    ),
    # NVIDIA L4 Tensor Core GPU datasheet: FP16 tensor 242 TFLOPS with sparsity, 300 GB/s,
    # 24 GB GDDR6.
    Product(
        name="L4",
        patterns=(("l4",),),
        tflops=121.0,
        memory_bandwidth_gbps=300.0,
        memory_mib=24576,
        bf16=True,
    ),
    # NVIDIA L40S datasheet: FP16 tensor 733 TFLOPS with sparsity (362 dense), 864 GB/s,
    # 48 GB GDDR6.
    Product(
        name="L40S",
        patterns=(("l40s",),),
        tflops=362.05,
        memory_bandwidth_gbps=864.0,
        memory_mib=46068,
        bf16=True,
    ),
    # NVIDIA T4 Tensor Core GPU datasheet: mixed-precision (FP16/FP32) 65 TFLOPS, 320 GB/s,
    # 16 GB GDDR6; Turing (compute capability 7.5): no native bfloat16.
    Product(
        name="T4",
        patterns=(("t4",),),
        tflops=65.0,
        memory_bandwidth_gbps=320.0,
        memory_mib=15360,
        bf16=False,
    ),
    # NVIDIA Ada GPU Architecture whitepaper, appendix A: GeForce RTX 4090 peak FP16 tensor
    # TFLOPS with FP32 accumulate 165.2 (dense; PyTorch accumulates in FP32), 1,008 GB/s,
    # 24 GB GDDR6X.
    Product(
        name="GeForce RTX 4090",
        patterns=(("rtx", "4090"), ("rtx4090",)),
        tflops=165.2,
        memory_bandwidth_gbps=1008.0,
        memory_mib=24564,
        bf16=True,
    ),
)


VENDOR_WORDS = frozenset({"nvidia", "tesla", "geforce", "jetson", "developer", "kit"})


def tokens(product: str) -> tuple[str, ...]:
    """`NVIDIA-A100-SXM4-80GB` -> (`a100`, `sxm4`, `80gb`): lower-case words split at
    anything but letters and digits, without the vendor words GFD puts in front."""
    words = re.split(r"[^a-z0-9]+", product.lower())
    return tuple(w for w in words if w and w not in VENDOR_WORDS)


def find_product(label: str) -> Product | None:
    """The table's entry for a `nvidia.com/gpu.product` value, or None when unknown: the
    first product (table order) one of whose patterns is a run of the label's words."""
    words = tokens(label)
    for product in PRODUCTS:
        for pattern in product.patterns:
            size = len(pattern)
            if any(words[i : i + size] == pattern for i in range(len(words) - size + 1)):
                return product
    return None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Gpu:
    """The GPUs of one node as the planner sees them."""

    product: str
    """The `nvidia.com/gpu.product` label ("" when absent)."""
    count: int
    """GPUs free for this pipeline: the label's count, at most the allocatable ones, less
    those other pods hold."""
    memory_bytes: int
    """Memory of one GPU (discrete GPUs); a unified board's budget is the node's memory."""
    tflops: float
    """Dense fp16 TFLOP/s of one GPU: `llmpipe.io/tflops` if labelled, else the table's."""
    memory_bandwidth_gbps: float
    bf16: bool
    unified: bool


def read_gpu(
    labels: Mapping[str, str],
    *,
    where: str,
    tflops: float | None,
    memory_bandwidth_gbps: float | None,
    allocatable: int | None = None,
    held: int = 0,
) -> Gpu | None:
    """The node's GPUs from its GFD labels; None when it has none (or none free).

    `tflops` / `memory_bandwidth_gbps` are the node's own figures when a label (or the
    cluster file) gives them: they win over the product table. `allocatable` is
    `status.allocatable["nvidia.com/gpu"]` on a live node (None in a cluster file);
    `held` the GPUs other pods request there. A GPU whose memory neither GFD nor the
    table knows is an error (DeviceError): the planner cannot budget it. A node whose GPUs
    carry no GFD labels at all plans as a CPU node.
    """
    count = _count(labels, where)
    if allocatable is not None:
        count = allocatable if LABEL_GPU_COUNT not in labels else min(count, allocatable)
    count -= max(held, 0)
    if count <= 0:
        return None
    product_label = labels.get(LABEL_GPU_PRODUCT, "")
    if not product_label and LABEL_GPU_MEMORY not in labels:
        return None  # the device plugin without GFD: nothing says what the GPU is
    product = find_product(product_label) if product_label else None
    unified = product.unified if product is not None else False
    unified = _flag(labels, LABEL_UNIFIED_MEMORY, where, default=unified)
    memory_mib = _memory_mib(labels, where)
    if memory_mib is None and product is not None:
        memory_mib = product.memory_mib
    if memory_mib is None and not unified:
        raise DeviceError(
            f"{where}: {count} GPU(s) but no {LABEL_GPU_MEMORY} label and product "
            f"{product_label or '(no ' + LABEL_GPU_PRODUCT + ' label)'} is not in the table; "
            f"label {LABEL_GPU_MEMORY} (MiB per GPU) to plan on its memory"
        )
    speed = tflops if tflops is not None else (product.tflops if product else None)
    bandwidth = memory_bandwidth_gbps
    if bandwidth is None and product is not None:
        bandwidth = product.memory_bandwidth_gbps
    if speed is None or bandwidth is None:
        missing = "llmpipe.io/tflops" if speed is None else "llmpipe.io/memory-bandwidth-gbps"
        raise DeviceError(
            f"{where}: GPU product {product_label or '(unlabelled)'} is not in the table; "
            f"label {missing} to plan on its GPU"
        )
    return Gpu(
        product=product_label,
        count=count,
        memory_bytes=(memory_mib or 0) * 2**20,
        tflops=speed,
        memory_bandwidth_gbps=bandwidth,
        bf16=product.bf16 if product is not None else True,
        unified=unified,
    )


def gpu_dtype(gpu: Gpu) -> str:
    """A GPU stage's dtype under `spec.model.dtype: auto`: bfloat16 where the GPU runs it
    natively, float16 otherwise (the same bytes, so the plan's sizes do not change)."""
    return "bfloat16" if gpu.bf16 else "float16"


CPU_AUTO_DTYPE = "bfloat16"
"""A CPU stage's dtype under `auto`: what every CPU stage ran before devices existed (half
the memory of float32, and faster on CPUs with native bf16 dot products)."""


def _count(labels: Mapping[str, str], where: str) -> int:
    text = labels.get(LABEL_GPU_COUNT)
    if text is None:
        return 0
    if not text.strip().isdigit():
        raise DeviceError(f"{where}: label {LABEL_GPU_COUNT} must be a whole number, got {text!r}")
    return int(text)


def _memory_mib(labels: Mapping[str, str], where: str) -> int | None:
    text = labels.get(LABEL_GPU_MEMORY)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise DeviceError(
            f"{where}: label {LABEL_GPU_MEMORY} must be a positive number of MiB, got {text!r}"
        )
    return math.floor(value)


def _flag(labels: Mapping[str, str], key: str, where: str, *, default: bool) -> bool:
    text = labels.get(key)
    if text is None:
        return default
    if text.lower() not in ("true", "false"):
        raise DeviceError(f"{where}: label {key} must be true or false, got {text!r}")
    return text.lower() == "true"
