"""Where a one-stage pipeline's decode step goes: the stage process's CPU per thread over a
decode window, the same step timed in-process without a server, and the cost model's
estimate from a node probe run at the same CPU budget.

    sudo PYTHONPATH=operator:stage_image:. python bench/stage0_cpu.py [--cpus 0.45]

The model and load are bench/emulated_cluster.py's (24 layers, hidden 512, float32, 24
streamed completions of 48 tokens after 8-token prompts). The stage process, the
in-process timing and the probe each run in a cgroup of `--cpus` cores (a quota over a
10 ms period, as tests/support/emulated.py's nodes; 1: one whole core); the load's client
threads do not.

Three figures per step, side by side:
- `pipeline`: stage 0's `llmpipe_stage_compute_seconds` per step over the decode window,
  and the process's CPU split into the compute thread (the step) and everything else (the
  HTTP front end, SSE writes, detokenizing, the coordinator's loop): the front-end cost;
- `in-process`: the same embed + layers + sample at the same batch, timed in a bare
  `StageRuntime` (no server, no event loop);
- `estimate`: `cost.compute_seconds` at the batch, from the probe's figures.

Needs root (cgroup v1 cpu). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import emulated_cluster
from tests.dataplane import pipelines
from tests.support import emulated

ROOT = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")
PROMPT = 8


def write_model(directory: Path, layers: int) -> Path:
    from llmpipe_stage import demo

    return demo.write_model(
        directory, family="llama", hidden_size=512, intermediate_size=1408,
        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
        max_position_embeddings=1024,
    )  # fmt: skip


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of `pid`."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / TICK
    return out


def cgroup(cpus: float) -> Path:
    """A cgroup of `cpus` cores (its quota over a 10 ms period; 1: one whole core, so the
    machine's other work does not share it) with the largest shares, as a node's."""
    path = emulated.CGROUP_CPU / f"llmpipe-stage0-cpu-{os.getpid()}"
    path.mkdir()
    (path / "cpu.cfs_period_us").write_text(str(emulated.PERIOD_US))
    (path / "cpu.shares").write_text(str(emulated.SHARES))
    (path / "cpu.cfs_quota_us").write_text(str(int(cpus * emulated.PERIOD_US)))
    return path


def in_cgroup(path: Path) -> list[str]:
    return ["sh", "-c", f'echo $$ > {path / "cgroup.procs"} && exec "$@"', "stage0-cpu"]


def pipeline_figures(model: Path, args: argparse.Namespace, group: Path) -> dict[str, Any]:
    """One stage process (in `group`), a warm-up, then the decode window."""
    run_dir = Path(tempfile.mkdtemp(prefix="llmpipe-stage0-"))
    pipeline = pipelines.Pipeline.start(
        model,
        run_dir,
        stages=1,
        max_sequences=args.sequences,
        max_context=PROMPT + args.new + 8,
        prefixes=[in_cgroup(group)],
        plaintext=True,
        ready_timeout=300,
    )
    try:
        pid = pipeline.processes[0].pid
        emulated_cluster.load(pipeline, sequences=2, new=4, prompt=PROMPT)
        marks: list[dict[int, float]] = []
        metrics = emulated_cluster.stage_metrics

        def marked(p: pipelines.Pipeline) -> list[tuple[float, float, float]]:
            marks.append(thread_cpu(pid))  # at the window's opening and closing
            return metrics(p)

        emulated_cluster.stage_metrics = marked  # type: ignore[assignment]
        try:
            window = emulated_cluster.decode_window(
                pipeline, sequences=args.sequences, new=args.new, prompt=PROMPT
            )
        finally:
            emulated_cluster.stage_metrics = metrics  # type: ignore[assignment]
    finally:
        pipeline.stop()
    (seconds0, tokens0, steps0), (seconds1, tokens1, steps1) = (
        window["before"][0],
        window["after"][0],
    )
    steps, tokens = steps1 - steps0, tokens1 - tokens0
    used = {tid: marks[1].get(tid, 0.0) - marks[0].get(tid, 0.0) for tid in marks[1]}
    compute_thread = max(used, key=lambda tid: used[tid])  # the step's thread, busy throughout
    front = sum(v for tid, v in used.items() if tid != compute_thread)
    return {
        "tokensPerSecond": window["tokensPerSecond"],
        "stepSeconds": (seconds1 - seconds0) / steps,
        "batchTokens": tokens / steps,
        "computeCpuPerStep": used[compute_thread] / steps,
        "frontCpuPerToken": front / tokens,
        "frontShare": front / sum(used.values()),
    }


def in_process(model: Path, args: argparse.Namespace) -> dict[str, Any]:
    """A bare StageRuntime of the whole model (the server's fused decode path): S prompts,
    then decode steps of all S sequences, each part of the step timed; then the probe."""
    import torch

    from llmpipe_stage import decode, loading, runtime, wire

    torch.set_num_threads(1)
    sequences = args.sequences
    fuser = decode.Fuser(quantize="none", pack_for=sequences)
    stage = loading.build_slice(
        model,
        layer_start=0,
        layer_end=args.layers,
        has_embedding=True,
        has_head=True,
        dtype=torch.float32,
        on_layer=fuser,
    )
    rt = runtime.StageRuntime(
        stage,
        context_limit=PROMPT + args.new + 8,
        max_sequences=sequences,
        quantization="none",
        fused=fuser.layers,
    )
    last = {}
    for sid in range(sequences):
        prompt = [3 + (sid * 7 + i) % 250 for i in range(PROMPT)]
        steps = [wire.Step(sid, 0, PROMPT)]
        last[sid] = rt.sample(steps, rt.run(steps, rt.embed(prompt)))[-1]
    parts: dict[str, list[float]] = {"embed": [], "layers": [], "sample": [], "cpu": []}
    for k in range(args.new - 1):
        steps = [wire.Step(sid, PROMPT + k, 1) for sid in range(sequences)]
        cpu, started = time.process_time(), time.perf_counter()
        hidden = rt.embed([last[sid] for sid in range(sequences)])
        embedded = time.perf_counter()
        hidden = rt.run(steps, hidden)
        ran = time.perf_counter()
        sampled = rt.sample_scored(steps, hidden)
        done = time.perf_counter()
        parts["cpu"].append(time.process_time() - cpu)
        parts["embed"].append(embedded - started)
        parts["layers"].append(ran - embedded)
        parts["sample"].append(done - ran)
        last = dict(zip(range(sequences), sampled.tokens, strict=True))
    figures = {name: statistics.median(values) for name, values in parts.items()}
    command = emulated.probe_command([], seconds=args.probe_seconds)
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'stage_image'}:{ROOT / 'operator'}:{ROOT}")
    probe = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return {"step": figures, "probe": json.loads(probe.stdout)}


def estimate(model: Path, facts: dict[str, Any], args: argparse.Namespace) -> dict[str, float]:
    from llmpipe_cli import modelfiles
    from llmpipe_operator.planning import cost, live, measured

    node: dict[str, Any] = {
        "metadata": {"name": "here", "labels": {}, "annotations": {}},
        "spec": {},
        "status": {
            "allocatable": {"memory": str(8 * 2**30)},
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }
    node["metadata"]["annotations"] = measured.node_annotations(
        node, facts=facts, links={}, margin=0.1
    )
    inventory = live.build_inventory([node], eligibility=live.Eligibility()).inventory
    profile = modelfiles.load_profile(model)
    workload = cost.Workload(
        max_sequences=args.sequences,
        max_context_tokens=PROMPT + args.new + 8,
        runtime_overhead_bytes=256 * 2**20,
    )
    here = inventory.node("here")
    weights = cost.weight_bytes(profile, 0, args.layers)
    batch, layers = float(args.sequences), args.layers
    return {
        "total": cost.compute_seconds(
            profile, here, weights, batch=batch, workload=workload, layers=layers
        ),
        "products": weights * cost.product_seconds_per_byte(profile, here, workload, batch=batch),
        "fixed": cost.fixed_seconds(here, batch=batch, layers=layers),
        "kv": cost.kv_read_seconds(profile, here, workload, batch=batch, layers=layers),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpus", type=float, default=1.0)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--sequences", type=int, default=24)
    parser.add_argument("--new", type=int, default=48)
    parser.add_argument("--probe-seconds", type=float, default=2.0)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_process:  # the child: already in the cgroup
        print(json.dumps(in_process(args.model_dir, args)))
        return 0
    model = write_model(Path(tempfile.mkdtemp(prefix="llmpipe-stage0-model-")) / "m", args.layers)
    group = cgroup(args.cpus)
    try:
        print(f"cpus {args.cpus}; load average {emulated_cluster.load_average()}")
        seen = pipeline_figures(model, args, group)
        child = [
            *in_cgroup(group),
            sys.executable,
            "-m",
            "bench.stage0_cpu",
            "--in-process",
            "--model-dir",
            str(model),
            *("--layers", str(args.layers), "--sequences", str(args.sequences)),
            *("--new", str(args.new), "--probe-seconds", str(args.probe_seconds)),
        ]
        env = dict(os.environ, PYTHONPATH=f"{ROOT / 'operator'}:{ROOT / 'stage_image'}:{ROOT}")
        done = subprocess.run(child, capture_output=True, text=True, check=True, env=env, cwd=ROOT)
        bare = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        group.rmdir()
    est = estimate(model, bare["probe"], args)
    step = bare["step"]
    bare_total = step["embed"] + step["layers"] + step["sample"]
    print(f"load average after: {emulated_cluster.load_average()}")
    print(
        f"pipeline:   {seen['batchTokens']:.1f} tokens/step, step {seen['stepSeconds'] * 1e3:.1f} "
        f"ms ({seen['tokensPerSecond']:.1f} tok/s); compute thread "
        f"{seen['computeCpuPerStep'] * 1e3:.1f} ms CPU/step; the rest "
        f"{seen['frontCpuPerToken'] * 1e3:.3f} ms CPU/token ({seen['frontShare']:.1%} of the CPU)"
    )
    print(
        f"in-process: step {bare_total * 1e3:.1f} ms (embed {step['embed'] * 1e3:.2f}, layers "
        f"{step['layers'] * 1e3:.1f}, sample {step['sample'] * 1e3:.2f}), "
        f"{step['cpu'] * 1e3:.1f} ms CPU"
    )
    print(
        f"estimate:   {est['total'] * 1e3:.1f} ms (products {est['products'] * 1e3:.1f}, "
        f"fixed {est['fixed'] * 1e3:.1f}, kv {est['kv'] * 1e3:.2f})"
    )
    print(
        f"pipeline / estimate {seen['stepSeconds'] / est['total'] - 1:+.0%}; in-process / "
        f"estimate {bare_total / est['total'] - 1:+.0%}; pipeline / in-process "
        f"{seen['stepSeconds'] / bare_total - 1:+.0%}"
    )
    probe = bare["probe"]
    keys = ("tflops", "layerStepSeconds", "layerTokenSeconds", "stepSeconds", "hopSeconds")
    print("probe: " + ", ".join(f"{k} {probe[k]:.3g}" for k in keys))
    print(f"probe product curve: {probe['productSecondsPerByte']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
