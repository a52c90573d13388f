"""The CPU dtype choice: bfloat16 only where /proc/cpuinfo reports native bf16 dot products."""

from __future__ import annotations

import os

import pytest

from llmpipe_stage import cpu

ZEN4 = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n"
SKYLAKE = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw avx512_vnni\n"
SAPPHIRE_RAPIDS = "flags\t\t: avx512f amx_bf16 amx_tile amx_int8\n"
NEOVERSE_V1 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
CORTEX_A72 = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"


def test_bf16_where_the_cpu_multiplies_it_natively() -> None:
    assert cpu.auto_dtype(ZEN4) == "bfloat16"
    assert cpu.auto_dtype(SAPPHIRE_RAPIDS) == "bfloat16"
    assert cpu.auto_dtype(NEOVERSE_V1) == "bfloat16"


def test_float32_elsewhere() -> None:
    assert cpu.auto_dtype(SKYLAKE) == "float32"
    assert cpu.auto_dtype(CORTEX_A72) == "float32"
    assert cpu.auto_dtype("") == "float32"


def test_flags_are_whole_words() -> None:
    assert cpu.cpu_flags("flags : avx512_bf16x foo\n") == {"avx512_bf16x", "foo"}
    assert not cpu.native_bf16("flags : avx512_bf16x\n")


def test_stage_sets_a_passive_openmp_wait_policy_unless_the_environment_has_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from llmpipe_stage import __main__ as stage_main

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    stage_main.sleep_between_parallel_regions()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    stage_main.sleep_between_parallel_regions()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
