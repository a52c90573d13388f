"""GPU benchmark and tests, one script for a GPU machine (a few minutes on one GPU).

    python3 bench/gpu.py --fetch-wheels      # on a machine with PyPI: the missing packages
                                             # as wheels in .whl/ (for a machine without PyPI)
    python3 bench/gpu.py                     # on the GPU machine, in the repository root

On the GPU machine it:
0. checks that torch sees a CUDA device and that the stage's packages import; what is
   missing is installed from .whl/ (pip --no-index, into /tmp/llmpipe-site), else from PyPI
   if it can be reached, else it stops and says which wheels to carry;
1. runs the `gpu` tests (tests/dataplane/test_gpu.py: exact greedy match on one GPU with
   1-4 stage processes, device-only loading, KV cache release);
2. per hop, device -> page-locked host -> wire bytes -> host -> device for one micro-batch
   of hidden states at batch 1/8/32, in one process (the codec and the copies, no network);
3. decode tokens/s at batch 1/8/32 for 1-4 stage processes sharing the GPU (bfloat16, plan
   device cuda, mutual TLS between stages) against single-process `generate` at the same
   batch on the same GPU, measured alternately; the ratio and, from the 1- and k-stage
   figures at batch 1, the per-hop cost of the ring (gRPC on loopback included);
4. the planner's estimate for the same model on this GPU (a one-node cluster labelled the
   way GPU Feature Discovery labels it) next to the measured 1-stage figure.
Figures are printed, never asserted (the tests assert); docs/benchmarks.md records a run.
With $OUT set, the figures are also written to $OUT/gpu-bench.json and the test log to
$OUT/gpu-tests.log.
"""

from __future__ import annotations

import sys

# bench/ also holds operator.py, which would shadow the stdlib `operator` module.
if sys.path and sys.path[0].rstrip("/").endswith("bench"):
    del sys.path[0]

import argparse
import importlib
import json
import os
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
SITE = Path("/tmp/llmpipe-site")
# import name -> the pinned distribution (constraints.txt) to carry when it is missing
NEEDED = {
    "grpc": "grpcio",
    "grpc_health": "grpcio-health-checking",
    "google.protobuf": "protobuf",
    "cryptography": "cryptography",
    "cffi": "cffi",
    "aiohttp": "aiohttp",
    "prometheus_client": "prometheus-client",
    "transformers": "transformers",
    "safetensors": "safetensors",
    "yaml": "PyYAML",
    "numpy": "numpy",
    "pytest": "pytest",
    "pytest_timeout": "pytest-timeout",
    "pytest_asyncio": "pytest-asyncio",
    "hypothesis": "hypothesis",
}
UNPINNED = {"cffi": "cffi==2.0.0"}
"""Dependencies of pinned packages that constraints.txt does not pin itself."""


def say(message: str) -> None:
    print(message, flush=True)


DEVICE = "cuda"
"""`--smoke` runs the whole script on the CPU (tiny model, float32) to check it, here."""
DTYPE = "bfloat16"


def sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


# -- 0. what the stage needs -------------------------------------------------------------------
def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            out[name.lower()] = f"{name}=={version}"
    return out


def fetch_wheels() -> int:
    """Download the pinned wheels a stock CUDA+PyTorch image may lack (CPython 3.12)."""
    pinned = pins()
    WHEELS.mkdir(exist_ok=True)
    platforms = [f"manylinux_2_{n}_x86_64" for n in (17, 27, 28, 31, 34)] + ["manylinux2014_x86_64"]
    for dist in sorted(set(NEEDED.values())):
        if dist in ("numpy", "PyYAML", "pytest", "safetensors", "aiohttp"):
            continue  # every CUDA PyTorch image has these
        spec = pinned.get(dist.lower()) or UNPINNED.get(dist, dist)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        command += ["--python-version", "3.12", "--implementation", "cp", "-d", str(WHEELS)]
        for platform in platforms:
            command += ["--platform", platform]
        say(f"fetching {spec}")
        subprocess.run([*command, spec], check=True)
    say(f"wheels in {WHEELS}: carry it (device run carry=['.whl'])")
    return 0


def missing() -> list[str]:
    """Distributions that do not import, or too old for the generated gRPC code (its
    protobuf and grpcio versions are checked when stage_pb2 / stage_pb2_grpc import)."""
    absent = []
    for module, dist in NEEDED.items():
        try:
            importlib.import_module(module)
        except ImportError:
            absent.append(dist)
    sys.path[:0] = [str(ROOT / "stage_image")]
    for module, dist in (("stage_pb2", "protobuf"), ("stage_pb2_grpc", "grpcio")):
        try:
            importlib.import_module(f"llmpipe_stage.proto.{module}")
        except ImportError:
            pass  # reported above
        except Exception as error:  # noqa: BLE001 - protobuf's VersionError, grpc's RuntimeError
            say(f"{dist} is too old for the generated code: {error}")
            absent.append(dist)
    del sys.path[0]
    return sorted(set(absent))


def install(absent: list[str]) -> None:
    """From .whl/ when carried (no index), else from PyPI; then import from SITE."""
    if WHEELS.is_dir() and any(WHEELS.glob("*.whl")):
        command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
        command += ["--no-compile", "--upgrade", "--target", str(SITE)]
        command += [str(w) for w in sorted(WHEELS.glob("*.whl"))]
    else:
        pinned = pins()
        specs = [pinned.get(d.lower(), d) for d in absent]
        command = [sys.executable, "-m", "pip", "install", "-q", "--target", str(SITE), *specs]
    say(f"installing: {' '.join(absent)}")
    if subprocess.run(command, check=False).returncode != 0:
        raise SystemExit(
            f"could not install {absent}: run `python3 bench/gpu.py --fetch-wheels` where "
            "PyPI is reachable and carry .whl/ to this machine"
        )


def environment() -> dict[str, str]:
    """PYTHONPATH for this process and the stage processes it starts."""
    paths = [str(SITE)] if SITE.is_dir() else []
    paths += [str(ROOT / "stage_image"), str(ROOT)]
    return {"PYTHONPATH": ":".join(paths)}


def prepare() -> None:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(f"torch {torch.__version__} sees no CUDA device: nothing to measure")
    absent = missing()
    if absent and os.environ.get("LLMPIPE_GPU_BENCH_INSTALLED"):
        raise SystemExit(f"still missing after the install: {absent}")
    if absent:
        install(absent)
        # a fresh interpreter: modules that failed to import stay cached in this one
        env = {**os.environ, **environment(), "LLMPIPE_GPU_BENCH_INSTALLED": "1"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    sys.path[:0] = [str(ROOT / "stage_image"), str(ROOT / "operator"), str(ROOT)]
    say(
        f"gpu: {torch.cuda.get_device_name(0)}; torch {torch.__version__} (CUDA "
        f"{torch.version.cuda}); {os.cpu_count()} cores"
    )


# -- 1. the gpu tests ----------------------------------------------------------------------------
def run_tests(out: Path | None) -> int:
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/dataplane/test_gpu.py", "-q"]
    say(f"\n## gpu tests: {' '.join(command[1:])}")
    env = {**os.environ, **environment()}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    text = result.stdout + result.stderr
    if out is not None:
        (out / "gpu-tests.log").write_text(text)
    say("\n".join(text.strip().splitlines()[-15:]))
    return result.returncode


# -- 2. per hop ----------------------------------------------------------------------------------
def per_hop(hidden_size: int, batches: list[int], *, calls: int) -> dict[str, float]:
    import torch

    from llmpipe_stage import devices, wire
    from llmpipe_stage.proto import stage_pb2

    say(
        f"\n## per hop in one process, hidden {hidden_size}, {DTYPE}: device -> page-locked "
        "host -> wire bytes -> host -> device (median of "
        f"{calls})"
    )
    device = torch.device(DEVICE)
    dtype = wire.DTYPE_NAMES[DTYPE]
    figures = {}
    for batch in batches:
        hidden = torch.randn(batch, hidden_size, device=device).to(dtype)
        steps = [wire.Step(sequence_id=i, position=5, length=1) for i in range(batch)]
        times = []
        for _ in range(calls):
            sync()
            started = time.perf_counter()
            data = wire.encode_activations(steps, devices.to_host(hidden)).SerializeToString()
            message = stage_pb2.Activations.FromString(data)
            _, back = wire.decode_activations(message, hidden_size=hidden_size, dtype=dtype)
            back.to(device, non_blocking=True)
            sync()
            times.append(time.perf_counter() - started)
        median = sorted(times)[len(times) // 2]
        figures[str(batch)] = median
        say(f"  batch {batch:>3}: {median * 1e6:8.1f} us per hop, {len(data)} bytes")
    return figures


# -- 3. throughput ---------------------------------------------------------------------------
MODEL = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
}
"""TinyLlama's shape with 16 layers (random weights, about 0.9 B parameters)."""


def write_model(path: Path) -> Path:
    from llmpipe_stage import demo

    if not (path / "config.json").is_file():
        say(f"writing a random Llama ({MODEL}) to {path} ...")
        demo.write_model(path, family="llama", **MODEL)
    return path


class Generate:
    """Single-process `generate` on the GPU, bfloat16, greedy, no early EOS."""

    def __init__(self, model_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, DTYPE))
        self.model = model.to(DEVICE).eval()

    def tokens_per_second(self, *, batch: int, prompt: int, new: int) -> float:
        torch = self.torch
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(3, 280, (batch, prompt), generator=generator).to(DEVICE)
        kwargs = {
            "attention_mask": torch.ones_like(ids),
            "do_sample": False,
            "max_new_tokens": new,
            "min_new_tokens": new,
            "pad_token_id": 0,
        }
        sync()
        started = time.perf_counter()
        self.model.generate(ids, **kwargs)
        sync()
        return batch * new / (time.perf_counter() - started)

    def close(self) -> None:
        del self.model
        if DEVICE == "cuda":
            self.torch.cuda.empty_cache()


def pipeline_tokens_per_second(base_url: str, *, batch: int, prompt: int, new: int) -> float:
    import torch

    from tests.dataplane import pipelines

    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(3, 280, (batch, prompt), generator=generator).tolist()

    def one(row: list[int]) -> int:
        status, body = pipelines.http_json(
            f"{base_url}/v1/completions",
            {
                "model": "bench",
                "prompt": row,
                "max_tokens": new,
                "temperature": 0,
                "ignore_eos": True,
            },
            timeout=600,
        )
        if status != 200:
            raise RuntimeError(f"completion failed: {status} {body}")
        return int(body["usage"]["completion_tokens"])

    one(rows[0][:4])  # warm-up
    with ThreadPoolExecutor(batch) as pool:
        started = time.perf_counter()
        produced = sum(pool.map(one, rows))
        took = time.perf_counter() - started
    return produced / took


def throughput(
    model_dir: Path,
    stage_counts: list[int],
    batches: list[int],
    *,
    prompt: int,
    new: int,
    repeat: int,
) -> dict[str, dict[str, float]]:
    from tests.dataplane import pipelines

    say(
        f"\n## decode throughput on one {DEVICE} device, {DTYPE}, prompt {prompt} tokens, "
        f"{new} new tokens per sequence; best of {repeat}, pipeline and generate alternately"
    )
    say(
        f"{'stages':>6} {'in flight':>9} {'pipeline tok/s':>15} {'generate tok/s':>15} {'ratio':>6}"
    )
    baseline = Generate(model_dir)
    baseline.tokens_per_second(batch=1, prompt=4, new=4)  # warm-up
    results: dict[str, dict[str, float]] = {}
    work = Path(tempfile.mkdtemp(prefix="llmpipe-gpu-bench-"))
    for stages in stage_counts:
        pipeline = pipelines.Pipeline.start(
            model_dir,
            work / f"run-{stages}",
            stages=stages,
            name="bench",
            max_sequences=max(batches),
            max_context=prompt + new + 8,
            device=DEVICE,
            dtype=DTYPE,
            ready_timeout=300,
            extra_args=("--threads", "2"),
        )
        try:
            for batch in batches:
                pipe = base = 0.0
                for _ in range(repeat):
                    pipe = max(
                        pipe,
                        pipeline_tokens_per_second(
                            pipeline.base_url, batch=batch, prompt=prompt, new=new
                        ),
                    )
                    base = max(
                        base, baseline.tokens_per_second(batch=batch, prompt=prompt, new=new)
                    )
                results[f"{stages}x{batch}"] = {"pipeline": pipe, "generate": base}
                say(f"{stages:>6} {batch:>9} {pipe:>15.1f} {base:>15.1f} {pipe / base:>6.2f}")
        finally:
            pipeline.stop()
    baseline.close()
    if 1 in stage_counts and 1 in batches:
        one = results["1x1"]["pipeline"]
        for stages in stage_counts:
            if stages > 1:
                extra = 1 / results[f"{stages}x1"]["pipeline"] - 1 / one
                say(
                    f"  ring per hop at batch 1 ({stages} stages vs 1): "
                    f"{extra / (stages - 1) * 1e3:.2f} ms"
                )
    return results


# -- 4. plan estimate ---------------------------------------------------------------------------
def plan_estimate(
    model_dir: Path, batches: list[int], measured: dict[str, dict[str, float]]
) -> dict[str, float]:
    import torch

    from llmpipe_operator.planning import inventory, planner, profiles

    if DEVICE == "cuda":
        name = torch.cuda.get_device_name(0)
        _free, total = torch.cuda.mem_get_info(0)
    else:  # the smoke run: an L4's labels, to exercise the path
        name, total = "NVIDIA-L4", 24 * 2**30
    labels = {
        "nvidia.com/gpu.count": "1",
        "nvidia.com/gpu.memory": str(total // 2**20),
        "nvidia.com/gpu.product": name.replace(" ", "-"),
    }
    cluster = inventory.parse_cluster(
        {
            "nodes": [
                {
                    "name": "this-gpu",
                    "tier": "cloud",
                    "memory": "16Gi",
                    "uplinkMbps": 10000,
                    "labels": labels,
                }
            ]
        }
    )
    config = json.loads((model_dir / "config.json").read_text())
    profile = profiles.from_config(config, dtype="bfloat16", name="bench")
    say(f"\n## plan estimate vs measurement (one stage on this GPU, labels {labels})")
    node = cluster.nodes[0]
    if node.gpu is None:
        say("  the product table does not know this GPU; no estimate")
        return {}
    say(
        f"  planner's GPU: {node.gpu.tflops} TFLOP/s, {node.gpu.memory_bandwidth_gbps} GB/s, "
        f"{node.gpu.memory_bytes / 2**30:.0f} GiB"
    )
    out = {}
    for batch in batches:
        workload = planner.Workload(max_sequences=batch, max_context_tokens=256)
        plan = planner.plan_pipeline(profile, cluster, workload=workload)
        got = measured.get(f"1x{batch}", {}).get("pipeline")
        out[str(batch)] = plan.est_tokens_per_second
        shown = f"{got:.1f}" if got else "-"
        ratio = f"{got / plan.est_tokens_per_second:.3f}" if got else "-"
        say(
            f"  batch {batch:>3}: estimate {plan.est_tokens_per_second:10.1f} tok/s, "
            f"measured {shown} tok/s (measured / estimate {ratio})"
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fetch-wheels", action="store_true")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="check the script on a CPU: tiny model, float32, 1-2 stages, no tests",
    )
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--stages", default="1,2,3,4")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--hop-calls", type=int, default=200)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "llmpipe-gpu")
    args = parser.parse_args()
    if args.fetch_wheels:
        return fetch_wheels()
    if args.smoke:
        global DEVICE, DTYPE
        DEVICE, DTYPE = "cpu", "float32"
        MODEL.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
        MODEL.update(num_attention_heads=4, num_key_value_heads=2)
        args.skip_tests, args.stages, args.batches = True, "1,2", "1,2"
        args.new_tokens, args.repeat, args.hop_calls = 8, 1, 20
        sys.path[:0] = [str(ROOT / "stage_image"), str(ROOT / "operator"), str(ROOT)]
    else:
        prepare()
    os.environ.update(environment())
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    report: dict[str, Any] = {}
    if not args.skip_tests:
        report["tests_exit_code"] = run_tests(out)
    batches = [int(b) for b in args.batches.split(",")]
    report["per_hop_seconds"] = per_hop(MODEL["hidden_size"], batches, calls=args.hop_calls)
    model_dir = write_model(args.work / ("smoke-model" if args.smoke else "model"))
    report["throughput"] = throughput(
        model_dir,
        [int(s) for s in args.stages.split(",")],
        batches,
        prompt=args.prompt_tokens,
        new=args.new_tokens,
        repeat=args.repeat,
    )
    report["estimate"] = plan_estimate(model_dir, batches, report["throughput"])
    if out is not None:
        (out / "gpu-bench.json").write_text(json.dumps(report, indent=2) + "\n")
    return int(report.get("tests_exit_code", 0))


if __name__ == "__main__":
    sys.exit(main())
