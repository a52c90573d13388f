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
With `--draft`, stage 0 also holds a draft model (`--speculate draft`, a random Llama of
hidden 512, 4 layers, the benchmark model's tokenizer): the slice then includes the
planner's D (`cost.draft_bytes`), and the run without the draft comes first, so the line
`draft: D estimated ... measured ...` compares D with what the draft added to the peak.
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
import shutil
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
DRAFT_SHAPE = {
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
}
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


def draft_dir(model: Path) -> Path:
    """A small random Llama with `model`'s vocabulary and tokenizer files (cached)."""
    path = CACHE.parent / f"stage-memory-draft-v1-{model.name}"
    if (path / "config.json").is_file():
        return path
    from bench import peer
    from llmpipe_stage import demo

    partial = path.with_suffix(".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shape = {**peer.MODEL_SHAPE, **DRAFT_SHAPE}
    demo.write_model(partial, family="llama", seed=1, **shape)
    for file in model.iterdir():  # the same tokenizer, file for file
        if file.is_file() and not file.name.startswith(("config", "generation_config", "model")):
            shutil.copy2(file, partial / file.name)
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


def workload_of(precision: str, draft: Path | None) -> object:
    from llmpipe_operator.planning import cost, profiles

    workload = cost.Workload(max_sequences=MAX_SEQUENCES, max_context_tokens=MAX_CONTEXT)
    if draft is None:
        return workload
    dtype = "bfloat16" if precision == "int8" else precision  # the draft is not quantized
    config = json.loads((draft / "config.json").read_text())
    return cost.with_draft(workload, profiles.from_config(config, dtype=dtype))


def slices(model: Path, precision: str, plan: dict[str, object], draft: Path | None) -> list[int]:
    from llmpipe_operator.planning import cost, profiles

    config = json.loads((model / "config.json").read_text())
    dtype, quantization = ("bfloat16", "int8") if precision == "int8" else (precision, "none")
    profile = profiles.from_config(config, dtype=dtype, quantization=quantization)
    workload = workload_of(precision, draft)
    assert isinstance(workload, cost.Workload)
    stages = plan["stages"]
    assert isinstance(stages, list)
    return [
        cost.memory_bytes(profile, workload, int(s["layerStart"]), int(s["layerEnd"]))
        for s in stages
    ]


def measure(model: Path, precision: str, stages: int, work: Path, draft: Path | None) -> int:
    """Prints each stage's figures; returns stage 0's peak RSS (bytes)."""
    from bench import peer
    from llmpipe_stage import config as stage_config

    extra = ["--speculate", "draft", "--draft-model", str(draft)] if draft else []
    peer.LLMPIPE_ARGS[:] = extra
    name = f"{precision}{'-draft' if draft else ''}"
    system = peer.start_llmpipe(
        model, stages=stages, precision=precision, threads=2, log=work / f"{name}.log"
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
        first_peak = 0
        for index, (pid, slice_bytes) in enumerate(
            zip(pids, slices(model, precision, plan, draft), strict=True)
        ):
            peak = status_kb(pid, "VmHWM") * 1024
            now = status_kb(pid, "VmRSS") * 1024
            maps = by_mapping(pid)
            cuda = sum(kb for name, kb in maps.items() if CUDA_ONLY.search(name)) * 1024
            anon = (maps["[anon]"] + maps["[heap]"]) * 1024
            mb = 2**20
            first_peak = first_peak or peak
            print(
                f"{name:>15} stage {index}/{stages}: slice {slice_bytes / mb:6.0f} MB | "
                f"peak {peak / mb:6.0f} MB ({peak / slice_bytes:.2f}x) steady "
                f"{now / mb:6.0f} MB | CUDA-only files {cuda / mb:4.0f} MB, anon {anon / mb:5.0f} "
                f"MB | peak - CUDA {(peak - cuda) / mb:6.0f} MB "
                f"({(peak - cuda) / slice_bytes:.2f}x)",
                flush=True,
            )
        return first_peak
    finally:
        system.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--precisions", nargs="+", default=["bfloat16", "int8", "float32"])
    parser.add_argument("--stages", type=int, default=1)
    parser.add_argument(
        "--draft", action="store_true", help="also with a draft model on stage 0 (D's accuracy)"
    )
    args = parser.parse_args()
    model = model_dir()
    draft = draft_dir(model) if args.draft else None
    with tempfile.TemporaryDirectory(prefix="llmpipe-stage-memory-") as folder:
        for precision in args.precisions:
            alone = measure(model, precision, args.stages, Path(folder), None)
            if draft is not None:
                with_draft = measure(model, precision, args.stages, Path(folder), draft)
                workload = workload_of(precision, draft)
                estimated = getattr(workload, "first_stage_bytes", 0)
                print(
                    f"{precision:>15} draft: D estimated {estimated / 2**20:.0f} MB, "
                    f"measured {(with_draft - alone) / 2**20:.0f} MB (stage 0's peak with the "
                    "draft less its peak without)",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    raise SystemExit(main())
