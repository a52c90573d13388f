"""The compute dtype a CPU runs fastest, from the features its kernel reports.

bfloat16 halves the bytes a decode step reads, but it only pays where the CPU multiplies
bf16 natively: x86 with AVX512_BF16 or AMX-BF16 (`avx512_bf16` / `amx_bf16` in the flags of
/proc/cpuinfo), Arm with the BF16 extension (`bf16` in its Features). Elsewhere torch
converts bf16 to float32 in software and float32 is faster. Reads one file; no torch.
"""

from __future__ import annotations

from pathlib import Path

BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags(cpuinfo: str) -> set[str]:
    """Every flag of /proc/cpuinfo's `flags` (x86) and `Features` (Arm) lines."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def native_bf16(cpuinfo: str | None = None) -> bool:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    return bool(cpu_flags(cpuinfo) & BF16_FLAGS)


def auto_dtype(cpuinfo: str | None = None) -> str:
    """`bfloat16` on a CPU with native bf16 dot products, else `float32`."""
    return "bfloat16" if native_bf16(cpuinfo) else "float32"
