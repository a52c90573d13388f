"""The decode product kernel against torch's products: weight bytes read per second.

    PYTHONPATH=.:operator:stage_image python bench/kernel.py [--rows 1,4,8]
    PYTHONPATH=.:operator:stage_image python bench/kernel.py --profile 1 [--quantization int8]
        [--dtype float32] [--decode-layer off]

For each row count M, 16 matrices of 5632 x 1024 (the benchmark model's gate|up, 185 MB
in bf16, far beyond the caches) are multiplied in turn by M activation rows; best of 5
passes, as GB/s of weights read: the streaming read of the same bytes (`kernels.stream_read`,
the machine's bandwidth in the same run, on torch's threads and on one), llmpipe's kernel
(on torch's threads and on one; `kernels.small_linear`) against oneDNN's
packed bf16 (`decode.PackedProjection`), torch's `_weight_int8pack_mm` and MKL float32
`linear`, all with torch's default thread count.

`--profile S` instead runs the decode step of the peer benchmark's model (bench/peer.py,
bf16, one process holding all layers) for S sequences: the mean step time over 10 steps,
then torch.profiler's summary of 8 more (run it with OMP_WAIT_POLICY=PASSIVE, as a stage
process does). The step runs each layer as one `kernels.decode_layer` call where it can;
`--decode-layer off` runs the op-by-op step instead."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from llmpipe_stage import decode, demo, kernels, loading, runtime, wire

K, N, COUNT = 1024, 5632, 16


def best(fn: Callable[[object], object], weights: list, reps: int = 5) -> float:
    fn(weights[0])
    fastest = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        for w in weights:
            fn(w)
        fastest = min(fastest, time.perf_counter() - start)
    return fastest


def measure(m: int) -> dict[str, float]:
    """Bytes of weights read per second by each product for m activation rows."""
    xb = torch.randn(m, K, dtype=torch.bfloat16)
    xf = xb.float()
    wb = [torch.randn(N, K, dtype=torch.bfloat16) for _ in range(COUNT)]
    bf16 = N * K * 2 * COUNT
    rows = {"stream read (same bytes)": bf16 / best(kernels.stream_read, wb)}
    rows["bf16 kernel"] = bf16 / best(lambda w: kernels.small_linear(xb, w), wb)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows["stream read, 1 thread"] = bf16 / best(kernels.stream_read, wb)
    rows["bf16 kernel, 1 thread"] = bf16 / best(lambda w: kernels.small_linear(xb, w), wb)
    torch.set_num_threads(threads)
    packed = [decode.PackedProjection(decode.Projection(w, None), batch_hint=4) for w in wb]
    rows["bf16 oneDNN packed"] = bf16 / best(lambda p: p(xb), packed)
    del packed
    q = [decode.quantize_int8(w, scale_dtype=torch.bfloat16) for w in wb]
    del wb
    fs = [(w, s.float()) for w, s in q]
    rows["int8 kernel"] = bf16 / 2 / best(lambda p: kernels.small_linear(xb, p[0], p[1]), fs)
    rows["int8 _weight_int8pack_mm"] = (
        bf16 / 2 / best(lambda p: torch.ops.aten._weight_int8pack_mm(xb, p[0], p[1]), q)
    )
    del q, fs
    wf = [torch.randn(N, K) for _ in range(COUNT // 2)]
    rows["f32 kernel"] = bf16 / best(lambda w: kernels.small_linear(xf, w), wf)
    rows["f32 torch linear"] = bf16 / best(lambda w: torch.nn.functional.linear(xf, w), wf)
    del wf
    return rows


def profile_decode(seqs: int, quantization: str, *, layer: str, dtype: torch.dtype) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import peer  # the peer benchmark's model shape

    os.environ["LLMPIPE_DECODE_LAYER"] = layer  # read when the layers are fused
    model = Path(tempfile.gettempdir()) / "llmpipe-kernel-bench-model"  # written once
    if not (model / "config.json").is_file():
        demo.write_model(model, **peer.MODEL_SHAPE)
    stage = loading.build_whole(model, dtype=dtype)
    rt = runtime.StageRuntime(
        stage, context_limit=256, max_sequences=seqs, quantization=quantization
    )
    print(f"native decode layer: {all(f.native for f in rt.fused)}")
    last = {}
    for sid in range(seqs):
        steps = [wire.Step(sid, 0, 16)]
        last[sid] = rt.sample(steps, rt.run(steps, rt.embed(list(range(10 + sid, 26 + sid)))))[0]
    position = [16]

    def step() -> None:
        steps = [wire.Step(sid, position[0], 1) for sid in range(seqs)]
        tokens = rt.sample(steps, rt.run(steps, rt.embed([last[sid] for sid in range(seqs)])))
        last.update(enumerate(tokens))
        position[0] += 1

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(10):
        step()
    wall = (time.perf_counter() - start) * 100
    print(f"{seqs} seq, {dtype}, {quantization}: {wall:.1f} ms a step")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(8):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="1,4,8")
    parser.add_argument("--profile", type=int, default=0, help="profile S sequences' decode")
    parser.add_argument("--quantization", default="none")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument(
        "--decode-layer", default="on", choices=["on", "off"], help="off: op-by-op step"
    )
    args = parser.parse_args()
    print(f"kernel: {kernels.status()}; torch threads {torch.get_num_threads()}")
    if args.profile:
        layer = "" if args.decode_layer == "on" else "off"
        profile_decode(
            args.profile, args.quantization, layer=layer, dtype=getattr(torch, args.dtype)
        )
        return 0
    if not kernels.available():
        return 1
    torch.manual_seed(0)
    for m in (int(r) for r in args.rows.split(",")):
        rows = measure(m)
        for name, rate in rows.items():
            print(f"M={m} {name}: {rate / 1e9:.1f} GB/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
