"""Where a stage computes and in which dtype: the plan's device and dtype, or the machine's.

The operator's plan names each stage's device (`cuda` on a node GPU, else `cpu`) and dtype
(`planning.cost.stage_dtype`); `llmpipe serve` and plans written before devices existed
name neither, so `auto` picks here: the first CUDA device when torch sees one, else the
CPU; bfloat16 where the device runs it natively, float16 on older GPUs (compute
capability below 8.0, e.g. a T4), and on a CPU the pipeline's dtype. A Jetson-class board
(an integrated GPU: its memory is the host's) is a CUDA device like any other; its one
memory budget is the planner's business. No I/O beyond asking torch about the device.
"""

from __future__ import annotations

import dataclasses

import torch

from llmpipe_stage import wire

DEVICES = ("auto", "cpu", "cuda")


class DeviceError(ValueError):
    """The stage was told to compute on a device it cannot see; the text says what to do."""


@dataclasses.dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype
    integrated: bool = False
    """A GPU sharing the host's memory (Jetson): host and device copies cost no PCIe hop."""

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def describe(self) -> str:
        if not self.on_gpu:
            return f"cpu, {wire_name(self.dtype)}"
        kind = "integrated, unified memory" if self.integrated else "discrete"
        name = torch.cuda.get_device_name(self.device)
        return f"{self.device} ({name}, {kind}), {wire_name(self.dtype)}"


def wire_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in wire.DTYPE_NAMES.items()}[dtype]


def resolve_device(requested: str) -> torch.device:
    """`auto`: cuda:0 when torch sees a GPU, else the CPU; `cuda` insists on a GPU."""
    if requested not in DEVICES:
        raise DeviceError(f"device must be one of {DEVICES}, got {requested!r}")
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    if requested == "cuda":
        raise DeviceError(
            "this stage is placed on a GPU, but torch sees no CUDA device "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}): run the "
            "CUDA stage image (docs/stage-runtime.md, 'GPU stages') on a node whose GPU the "
            "NVIDIA device plugin hands to the pod, or set spec.runtime.device: cpu"
        )
    return torch.device("cpu")


def default_dtype(device: torch.device, *, cpu_dtype: torch.dtype) -> torch.dtype:
    """bfloat16 on GPUs of compute capability 8.0 and newer, float16 on older ones; on the
    CPU `cpu_dtype` (the pipeline's)."""
    if device.type != "cuda":
        return cpu_dtype
    major, _ = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16


def place(
    *, device: str, plan_dtype: str, pipeline_dtype: str, cpu_auto_dtype: str = "bfloat16"
) -> Placement:
    """The stage's device and dtype. `device` is the plan's (or `auto`); `plan_dtype` the
    plan stage's dtype ("" when the plan names none); `pipeline_dtype` pipeline.json's
    `model.dtype` (`auto` or a dtype); `cpu_auto_dtype` what a CPU runs under auto."""
    where = resolve_device(device or "auto")
    chosen = plan_dtype or pipeline_dtype
    if chosen and chosen != "auto":
        dtype = wire.DTYPE_NAMES[chosen]
    else:
        dtype = default_dtype(where, cpu_dtype=wire.DTYPE_NAMES[cpu_auto_dtype])
    integrated = where.type == "cuda" and bool(
        getattr(torch.cuda.get_device_properties(where), "is_integrated", False)
    )
    return Placement(device=where, dtype=dtype, integrated=integrated)


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A device tensor's copy in page-locked host memory (what the wire encoder reads), or
    the tensor itself on the CPU. The copy waits for the device: the compute thread calls
    this, never the event loop. Page-locked blocks come from torch's caching host
    allocator, so a fresh one per micro-batch costs no allocation once warm, and a block
    is reused only after the tensor that held it is gone (no buffer is overwritten while
    the sender still encodes it)."""
    if tensor.device.type == "cpu":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(tensor.device).synchronize()
    return host
