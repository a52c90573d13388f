"""llmpipe's decode product kernel (`llmpipe_stage.kernels`) against torch's product.

The kernel sums in float32 in its own order, so it is compared against a float64 reference
with a tolerance for the dtype's rounding, and its error is held to what torch's own product
of the same dtype makes (never worse than twice it, plus the output's rounding). Shapes
cover K and N that are not multiples of the vector widths (16 floats, 32 bf16, 4 rows per
block), 1 to 8 activation rows, bias and no bias. The selection tests check that decode
takes the kernel only for decode-sized inputs and says which path runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmpipe_stage import decode, kernels
from llmpipe_stage.kernels import __main__ as kernels_main

pytestmark = pytest.mark.skipif(
    not kernels.available(), reason=f"decode kernel: {kernels.status()}"
)

SHAPES = [(1, 1), (7, 3), (31, 5), (33, 9), (64, 64), (100, 17), (1024, 1030), (2049, 6)]


def reference(
    x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    y = x.double() @ w.double().T
    if scales is not None:
        y = y * scales.double()
    if bias is not None:
        y = y + bias.double()
    return y


def error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


@pytest.mark.parametrize("rows", range(1, 9))
@pytest.mark.parametrize(("k", "n"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_float_product_matches_torch(rows: int, k: int, n: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(rows * 1000 + k * 7 + n)
    x = torch.randn(rows, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if n % 2 else None
    y = kernels.small_linear(x, w, None, None if bias is None else bias.float())
    assert y.dtype == dtype and y.shape == (rows, n)
    ref = reference(x, w, None, bias)
    ours, torchs = error(y, ref), error(torch.nn.functional.linear(x, w, bias), ref)
    rounding = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-20
    assert ours <= 2 * torchs + rounding


@pytest.mark.parametrize("rows", range(1, 9))
@pytest.mark.parametrize(("k", "n"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_product_matches_torch(rows: int, k: int, n: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(rows * 1000 + k * 7 + n + 1)
    x = torch.randn(rows, k, generator=g).to(dtype)
    q, scales = decode.quantize_int8(torch.randn(n, k, generator=g), scale_dtype=dtype)
    bias = torch.randn(n, generator=g) if n % 2 else None
    y = kernels.small_linear(x, q, scales.float(), bias)
    assert y.dtype == dtype and y.shape == (rows, n)
    ref = reference(x, q, scales, bias)
    rounding = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-20
    assert error(y, ref) <= rounding
    # torch's int8 product (bf16 activations) reads out of bounds on tiny shapes (NaN or a
    # crash for K = 1), so it is compared on the model-like shape only.
    if dtype == torch.bfloat16 and (k, n) == (64, 64):
        plain = torch.ops.aten._weight_int8pack_mm(x, q, scales)
        if bias is not None:
            plain = plain + bias.to(dtype)
        assert error(y, ref) <= 2 * error(plain, ref) + rounding


def test_wrong_inputs_are_refused() -> None:
    x = torch.randn(9, 16)
    with pytest.raises(RuntimeError, match="1 to 8 rows"):
        kernels.small_linear(x, torch.randn(4, 16))
    with pytest.raises(RuntimeError, match="columns"):
        kernels.small_linear(x[:2], torch.randn(4, 15))
    with pytest.raises(RuntimeError, match="dtypes differ"):
        kernels.small_linear(x[:2], torch.randn(4, 16).bfloat16())
    with pytest.raises(RuntimeError, match="scales"):
        kernels.small_linear(x[:2], torch.zeros(4, 16, dtype=torch.int8))


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_projection_takes_the_kernel_for_decode_and_torch_for_prompts(quantize: str) -> None:
    w = torch.randn(48, 64).bfloat16()
    proj = decode.projection(
        [w[:16], w[16:]], [None, None], quantize=quantize, dtype=torch.bfloat16, pack_for=4
    )
    assert proj.small and not isinstance(proj, decode.PackedProjection)
    calls: list[int] = []
    original = kernels.small_linear

    def counting(x: torch.Tensor, *args: torch.Tensor | None) -> torch.Tensor:
        calls.append(x.shape[0])
        return original(x, *args)

    kernels.small_linear = counting  # type: ignore[assignment]
    try:
        decode_out = proj(torch.randn(2, 4, 64).bfloat16())  # 8 rows: decode-sized
        prompt_out = proj(torch.randn(9, 64).bfloat16())  # a prompt: torch's product
    finally:
        kernels.small_linear = original  # type: ignore[assignment]
    assert calls == [8]
    assert decode_out.shape == (2, 4, 48) and prompt_out.shape == (9, 48)
    view = proj.rows(16, 48)
    x = torch.randn(3, 64).bfloat16()
    assert torch.equal(view(x), proj(x)[:, 16:])


def test_status_says_which_path_runs() -> None:
    assert kernels.status().startswith("on (")
    assert kernels.library_name() in kernels.status()


def test_cpu_without_the_instructions_is_not_supported() -> None:
    assert not kernels.cpu_supported("flags\t: fpu sse2 avx2 fma avx512f avx512bw avx512vl\n")
    assert kernels.cpu_supported("flags\t: avx2 avx512f avx512bw avx512vl avx512_bf16\n")


def fresh_process_status(tmp_path: Path, **env: str) -> list[str]:
    """kernels.status() and whether a bf16 projection takes the kernel, in a new process
    whose cache is `tmp_path` (no library there)."""
    code = (
        "import torch\n"
        "from llmpipe_stage import decode, kernels\n"
        "p = decode.projection([torch.zeros(8, 64).bfloat16()], [None], quantize='none',"
        " dtype=torch.bfloat16, pack_for=4)\n"
        "print(kernels.status()); print(p.small, type(p).__name__)\n"
    )
    run_env = {k: v for k, v in os.environ.items() if k != "LLMPIPE_KERNEL_DIR"}
    run_env.update(XDG_CACHE_HOME=str(tmp_path), **env)
    done = subprocess.run(
        [sys.executable, "-c", code], env=run_env, capture_output=True, text=True, check=True
    )
    return done.stdout.splitlines()


def test_turned_off_it_runs_the_packed_torch_path(tmp_path: Path) -> None:
    status, path = fresh_process_status(tmp_path, LLMPIPE_KERNEL="off")
    assert status.startswith("off (LLMPIPE_KERNEL=off)")
    assert path == "False PackedProjection"


def test_without_a_compiler_it_falls_back_and_says_so(tmp_path: Path) -> None:
    status, path = fresh_process_status(tmp_path, CXX=str(tmp_path / "no-such-compiler"))
    assert status.startswith("off (no prebuilt kernel and no C++ compiler")
    assert path == "False PackedProjection"
    assert not (tmp_path / "llmpipe" / "kernels").exists()


def test_a_prebuilt_library_is_found_in_the_kernel_dir(tmp_path: Path) -> None:
    """The stage image's case: the library in $LLMPIPE_KERNEL_DIR, no compiler on PATH."""
    built = next(
        d / f"{kernels.library_name()}.so"
        for d in kernels.search_dirs()
        if (d / f"{kernels.library_name()}.so").is_file()
    )
    (tmp_path / "image").mkdir()
    shutil.copy(built, tmp_path / "image")
    status, path = fresh_process_status(
        tmp_path, CXX=str(tmp_path / "no-such-compiler"), LLMPIPE_KERNEL_DIR=str(tmp_path / "image")
    )
    assert status == f"on ({tmp_path / 'image' / built.name})"
    assert path == "True Projection"


def test_image_build_step_skips_other_architectures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(kernels_main.platform, "machine", lambda: "aarch64")
    assert kernels_main.main(["--build", str(tmp_path / "out")]) == 0
    assert "not built on aarch64" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
