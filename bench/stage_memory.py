"""A stage's memory against the slice the planner sizes for it (issue: peak RSS <= 1.3x).

    PYTHONPATH=.:operator:stage_image python bench/stage_memory.py
    PYTHONPATH=.:operator:stage_image python bench/stage_memory.py --precisions bfloat16 --stages 2

For each precision it starts `llmpipe serve` on the random benchmark Llama of bench/peer.py
(hidden 1024, 16 layers, ~213 M parameters; 4 sequences, 1,024-token context), sends a
512-token prompt and then 4 sequences at once, and reads every stage process's
`VmHWM` (the kernel's peak RSS) and `VmRSS` from /proc, and its resident memory by
mapping from /proc/PID/smaps. The slice is the planner's own `memory_s` (weights + KV
reservation + the runtime overhead R), from `planning.cost.memory_bytes`.

It prints two ratios per stage:
- `peak / slice`: the process as it runs here;
- `peak - CUDA / slice`: the same peak less the resident pages of files that only the CUDA
  build of torch ships (site-packages/nvidia/*, triton, torch/lib/*cuda*). The stage image
  installs the CPU build of torch, which has none of those files; this machine only has the
  CUDA build from PyPI. The pages are counted at the end of the run (they are mapped at
  `import torch` and do not change afterwards). Anonymous memory that the CUDA libraries
  allocate while loading stays counted, so the figure over-states the CPU build's.
Figures are printed, never asserted; docs/benchmarks.md records a run.
"""

from __future__ import annotations

import sys

if sys.path and sys.path[0].rstrip("/").endswith("bench"):
    del sys.path[0]

import argparse
import json
import os
import re
import signal
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("LLMPIPE_CACHE", Path.home() / ".cache" / "llmpipe")) / "llamacpp"
MAX_SEQUENCES = 4
MAX_CONTEXT = 1024
CUDA_ONLY = re.compile(r"/site-packages/(nvidia|triton)/|/torch/lib/[^/]*(cuda|nvrtc|cudnn|nccl)")


def say(text: str) -> None:
    print(f"[stage-memory] {text}", file=sys.stderr, flush=True)


def model_dir() -> Path:
    """The benchmark model of bench/peer.py (its weights; no GGUF tokenizer needed here)."""
    from bench import peer

    shared = CACHE / "model-v1"
    if (shared / "config.json").is_file():
        return shared
    path = CACHE.parent / "stage-memory-model-v1"
    if not (path / "config.json").is_file():
        sys.path.insert(0, str(ROOT / "stage_image"))
        from llmpipe_stage import demo

        say("writing the benchmark model (random Llama, ~213 M parameters) ...")
        partial = path.with_suffix(".partial")
        demo.write_model(partial, family="llama", **peer.MODEL_SHAPE)
        partial.rename(path)
    return path


def by_mapping(pid: int) -> Counter[str]:
    """Resident kB per mapping name (a file path, [heap], [anon], ...)."""
    rss: Counter[str] = Counter()
    name = "[anon]"
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                parts = line.split()
                name = parts[5] if len(parts) > 5 else "[anon]"
            elif line.startswith("Rss:"):
                rss[name] += int(line.split()[1])
    return rss


def status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def stage_pids(serve: int, count: int, timeout: float = 600) -> list[int]:
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [
            p.pid
            for p in psutil.Process(serve).children(recursive=True)
            if "llmpipe_stage" in " ".join(p.cmdline())
        ]
        if len(found) == count:
            return sorted(found)
        time.sleep(0.2)
    raise RuntimeError(f"{count} stage processes not found under {serve}")


def complete(port: int, prompt: list[int], new: int) -> None:
    body = {"model": "bench", "prompt": prompt, "max_tokens": new, "temperature": 0}
    body["ignore_eos"] = True
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=1800) as response:
        response.read()


def slices(model: Path, precision: str, plan: dict[str, object]) -> list[int]:
    from llmpipe_operator.planning import cost, profiles

    config = json.loads((model / "config.json").read_text())
    dtype, quantization = ("bfloat16", "int8") if precision == "int8" else (precision, "none")
    profile = profiles.from_config(config, dtype=dtype, quantization=quantization)
    workload = cost.Workload(max_sequences=MAX_SEQUENCES, max_context_tokens=MAX_CONTEXT)
    stages = plan["stages"]
    assert isinstance(stages, list)
    return [
        cost.memory_bytes(profile, workload, int(s["layerStart"]), int(s["layerEnd"]))
        for s in stages
    ]


def measure(model: Path, precision: str, stages: int, work: Path) -> None:
    from bench import peer
    from llmpipe_stage import config as stage_config

    system = peer.start_llmpipe(
        model, stages=stages, precision=precision, threads=2, log=work / f"{precision}.log"
    )
    serve = system.processes[0].pid
    try:
        pids = stage_pids(serve, stages)
        complete(system.port, peer.prompt_ids(512, seed=1), 8)
        threads = [
            threading.Thread(target=complete, args=(system.port, peer.prompt_ids(16, seed=i), 64))
            for i in range(MAX_SEQUENCES)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        layers = int(json.loads((model / "config.json").read_text())["num_hidden_layers"])
        plan = stage_config.even_plan(layers, stages)
        for index, (pid, slice_bytes) in enumerate(
            zip(pids, slices(model, precision, plan), strict=True)
        ):
            peak = status_kb(pid, "VmHWM") * 1024
            now = status_kb(pid, "VmRSS") * 1024
            maps = by_mapping(pid)
            cuda = sum(kb for name, kb in maps.items() if CUDA_ONLY.search(name)) * 1024
            anon = (maps["[anon]"] + maps["[heap]"]) * 1024
            mb = 2**20
            print(
                f"{precision:>9} stage {index}/{stages}: slice {slice_bytes / mb:6.0f} MB | "
                f"peak {peak / mb:6.0f} MB ({peak / slice_bytes:.2f}x) steady "
                f"{now / mb:6.0f} MB | CUDA-only files {cuda / mb:4.0f} MB, anon {anon / mb:5.0f} "
                f"MB | peak - CUDA {(peak - cuda) / mb:6.0f} MB "
                f"({(peak - cuda) / slice_bytes:.2f}x)",
                flush=True,
            )
    finally:
        system.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--precisions", nargs="+", default=["bfloat16", "int8", "float32"])
    parser.add_argument("--stages", type=int, default=1)
    args = parser.parse_args()
    model = model_dir()
    with tempfile.TemporaryDirectory(prefix="llmpipe-stage-memory-") as folder:
        for precision in args.precisions:
            measure(model, precision, args.stages, Path(folder))
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    raise SystemExit(main())
