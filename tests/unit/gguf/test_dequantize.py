"""The dequantization kernels against known block encodings: blocks built by hand from the
documented ggml layouts (the expected values computed from the codes and scales that went
in), round trips through the `gguf` package's quantizers, and agreement with its own
dequantizer (an independent implementation) on random blocks."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from llmpipe_stage import gguf_file

rng = np.random.default_rng(7)
kernels = pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"])


def f16_bytes(value: float) -> list[int]:
    return list(np.float16(value).tobytes())


def quant(name: str) -> gguf_file.Quant:
    return next(q for q in gguf_file.QUANTS.values() if q.name == name)


def test_q8_0_block_by_hand() -> None:
    codes = np.arange(-16, 16, dtype=np.int8)
    block = np.array(f16_bytes(0.5) + list(codes.tobytes()), dtype=np.uint8)[None]
    assert np.array_equal(gguf_file.dequant_q8_0(block)[0], 0.5 * codes.astype(np.float32))


def test_q4_0_and_q4_1_blocks_by_hand() -> None:
    codes = rng.integers(0, 16, 32).astype(np.uint8)
    # value j < 16 sits in the low nibble of byte j, value j + 16 in its high nibble
    packed = list((codes[:16] | (codes[16:] << 4)).astype(np.uint8))
    q4_0 = np.array(f16_bytes(0.25) + packed, dtype=np.uint8)[None]
    expected = 0.25 * (codes.astype(np.float32) - 8)
    assert np.array_equal(gguf_file.dequant_q4_0(q4_0)[0], expected)
    q4_1 = np.array(f16_bytes(0.25) + f16_bytes(-1.5) + packed, dtype=np.uint8)[None]
    assert np.array_equal(gguf_file.dequant_q4_1(q4_1)[0], 0.25 * codes + np.float32(-1.5))


def pack_q4_k_scales(scales: list[int], mins: list[int]) -> list[int]:
    """The 12-byte 6-bit packing of 8 scales and 8 mins, written out byte by byte."""
    out = [0] * 12
    for j in range(4):
        out[j] = scales[j] | ((scales[j + 4] >> 4) << 6)
        out[j + 4] = mins[j] | ((mins[j + 4] >> 4) << 6)
        out[j + 8] = (scales[j + 4] & 0x0F) | ((mins[j + 4] & 0x0F) << 4)
    return out


def test_q4_k_block_by_hand() -> None:
    scales = [int(s) for s in rng.integers(0, 64, 8)]
    mins = [int(m) for m in rng.integers(0, 64, 8)]
    codes = rng.integers(0, 16, 256).astype(np.uint8)
    qs = [0] * 128
    for sub in range(8):  # sub-block 2r: low nibbles of run r; 2r + 1: its high nibbles
        run, high = divmod(sub, 2)
        for i in range(32):
            qs[32 * run + i] |= int(codes[32 * sub + i]) << (4 * high)
    d, dmin = 0.125, 0.0625
    block = np.array(
        f16_bytes(d) + f16_bytes(dmin) + pack_q4_k_scales(scales, mins) + qs, dtype=np.uint8
    )[None]
    expected = np.array(
        [
            np.float32(d * scales[k // 32]) * np.float32(codes[k])
            - np.float32(dmin * mins[k // 32])
            for k in range(256)
        ],
        dtype=np.float32,
    )
    assert np.array_equal(gguf_file.dequant_q4_k(block)[0], expected)


def test_q6_k_block_by_hand() -> None:
    codes = rng.integers(0, 64, 256)
    scales = rng.integers(-128, 128, 16).astype(np.int8)
    ql, qh = [0] * 128, [0] * 64
    for k in range(256):  # the reference loop's layout, one value at a time
        half, rest = divmod(k, 128)
        quarter, i = divmod(rest, 32)
        low, high = int(codes[k]) & 0x0F, int(codes[k]) >> 4
        ql[64 * half + 32 * (quarter % 2) + i] |= low << (4 * (quarter // 2))
        qh[32 * half + i] |= high << (2 * quarter)
    d = 0.01
    block = np.array(ql + qh + list(scales.tobytes()) + f16_bytes(d), dtype=np.uint8)[None]
    d16 = np.float32(np.float16(d))
    expected = np.array(
        [d16 * np.float32(scales[k // 16]) * np.float32(codes[k] - 32) for k in range(256)],
        dtype=np.float32,
    )
    assert np.array_equal(gguf_file.dequant_q6_k(block)[0], expected)


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "F16", "BF16"])
def test_round_trip_through_ggufs_quantizer(name: str) -> None:
    values = (rng.standard_normal((8, 256)) * 0.3).astype(np.float32)
    packed = gguf.quants.quantize(values, gguf.GGMLQuantizationType[name])
    q = quant(name)
    ours = q.dequantize(packed.reshape(-1, q.block_bytes)).reshape(values.shape)
    theirs = gguf.quants.dequantize(packed, gguf.GGMLQuantizationType[name])
    assert np.array_equal(ours, theirs)
    # and close to what went in: within one quantization step per block
    step = {"Q8_0": 1 / 100, "Q4_0": 1 / 6, "Q4_1": 1 / 12, "F16": 1e-3, "BF16": 1e-2}[name]
    assert np.abs(ours - values).max() <= step * np.abs(values).max() + 1e-6


@kernels
def test_agrees_with_ggufs_dequantizer_on_random_blocks(name: str) -> None:
    q = quant(name)
    blocks = rng.integers(0, 256, (64, q.block_bytes)).astype(np.uint8)
    # Scales must be finite float16: overwrite them with sane values.
    scale_bytes = {"Q8_0": [(0, 2)], "Q4_0": [(0, 2)], "Q4_1": [(0, 2), (2, 4)],
                   "Q4_K": [(0, 2), (2, 4)], "Q6_K": [(208, 210)]}[name]  # fmt: skip
    for start, end in scale_bytes:
        scales = (rng.standard_normal(64) * 0.1).astype(np.float16)
        blocks[:, start:end] = scales.view(np.uint8).reshape(64, 2)
    ours = q.dequantize(blocks).reshape(-1)
    theirs = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[name]).reshape(-1)
    assert ours.dtype == np.float32
    assert np.array_equal(ours, theirs)


def test_bf16_widens_exactly() -> None:
    values = np.array([1.0, -2.5, 3.140625, 0.0], dtype=np.float32)
    raw = (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(-1, 2)
    assert np.array_equal(quant("BF16").dequantize(raw).reshape(-1), values)
