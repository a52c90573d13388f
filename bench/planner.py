"""Planner benchmark: planning time by cluster size, and plan quality against the splits
users get today. Prints tables; asserts nothing (figures go to docs/benchmarks.md).

    PYTHONPATH=operator python bench/planner.py [--repeat 3] [--only layers]

1. Time to plan Llama-2-7B (32 layers) and Llama-3-70B (80 layers) over deterministic
   synthetic clusters of 8 / 32 / 128 / 1000 nodes, both objectives (median of --repeat).
2. Layer scaling: a synthetic Llama-style model of 128 ... 1,024 layers (the spec's bound)
   over 8 nodes (exact search) and 32 nodes (heuristic): time and peak memory the
   planner allocates (tracemalloc), which grow near-linearly in layers x nodes.
3. On the heterogeneous example clusters: the planner's bottleneck and token latency
   against an even split of the layers over all nodes in file order (vLLM / gLLM
   pipeline default) and a split proportional to node memory (exo, llama.cpp RPC), all
   costed with the same cost model v1. A baseline that overflows a node's memory is
   reported as such (it would not start).
"""

from __future__ import annotations

import os
import sys

# bench/ also holds operator.py, which as sys.path[0] would shadow the stdlib `operator`
# module that argparse, random and statistics import. Drop the script's own folder.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

import argparse
import dataclasses
import json
import random
import statistics
import time
import tracemalloc
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "operator"))

from llmpipe_operator.planning import cost, inventory, planner, profiles  # noqa: E402

MODELS = ROOT / "examples" / "models"
CLUSTERS = ROOT / "examples" / "clusters"


def load_profile(name: str) -> profiles.ModelProfile:
    config = json.loads((MODELS / name / "config.json").read_text())
    return profiles.from_config(config, name=name)


def load_cluster(name: str) -> inventory.Inventory:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return inventory.parse_cluster(yaml.load((CLUSTERS / name).read_text(), Loader=loader))


# 1. planning time ------------------------------------------------------------------------

KINDS = [  # tier, memory GiB, tflops, GB/s, uplink Mbps
    ("edge", 8, 2.5, 68, 1000),
    ("edge", 16, 6, 102, 1000),
    ("edge", 32, 17, 205, 1000),
    ("cloud", 24, 60, 300, 10000),
    ("cloud", 48, 150, 768, 10000),
    ("cloud", 80, 250, 2039, 25000),
]


def synthetic_cluster(size: int, *, seed: int = 7) -> inventory.Inventory:
    rng = random.Random(seed * 100_003 + size)
    nodes = []
    for i in range(size):
        tier, memory, tflops, bandwidth, uplink = rng.choice(KINDS)
        nodes.append(
            inventory.Node(
                name=f"{tier}-{i}",
                tier=tier,  # type: ignore[arg-type]
                memory_bytes=memory * 2**30,
                tflops=tflops * rng.uniform(0.8, 1.2),
                memory_bandwidth_gbps=bandwidth * rng.uniform(0.8, 1.2),
                uplink_mbps=uplink,
            )
        )
    return inventory.Inventory(nodes=tuple(nodes))


def time_planning(repeat: int) -> None:
    print(f"## planning time (median of {repeat} runs; exact = optimum proven)")
    print(
        f"{'nodes':>6} {'layers':>6} {'objective':>10} {'time ms':>9} {'stages':>6} "
        f"{'search':>9} {'gap to lower bound':>18}"
    )
    models = {32: load_profile("Llama-2-7B"), 80: load_profile("Llama-3-70B")}
    for size in (8, 32, 128, 1000):
        cluster = synthetic_cluster(size)
        for layers, profile in models.items():
            for objective in cost.OBJECTIVES:
                workload = planner.Workload(objective=objective)
                times, plan = [], None
                for _ in range(repeat):
                    start = time.perf_counter()
                    plan = planner.plan_pipeline(profile, cluster, workload=workload)
                    times.append(time.perf_counter() - start)
                assert plan is not None
                gap = plan.gap
                print(
                    f"{size:>6} {layers:>6} {objective:>10} {statistics.median(times) * 1e3:>9.1f} "
                    f"{len(plan.stages):>6} {'exact' if plan.exact else 'heuristic':>9} "
                    f"{'-' if gap is None else f'{gap:.3f}x':>18}"
                )


# 2. layer scaling ------------------------------------------------------------------------


def deep_profile(layers: int) -> profiles.ModelProfile:
    """A 7B-wide Llama-style model with `layers` decoder layers (config bounds allow 1,024)."""
    config = json.loads((MODELS / "Llama-2-7B" / "config.json").read_text())
    config["num_hidden_layers"] = layers
    return profiles.from_config(config, name=f"llama-{layers}L")


def time_layers(repeat: int) -> None:
    print(f"\n## layer scaling (median of {repeat} runs; peak = planner allocations, tracemalloc)")
    print(
        f"{'nodes':>6} {'layers':>6} {'objective':>10} {'time ms':>9} {'peak MiB':>9} {'search':>9}"
    )
    for size in (8, 32):
        base = synthetic_cluster(size)
        for layers in (128, 256, 512, 1024):
            profile = deep_profile(layers)
            # enough memory that every node could hold a share of the deep model
            scale = max(1, layers // 32)
            cluster = inventory.Inventory(
                nodes=tuple(
                    dataclasses.replace(n, memory_bytes=n.memory_bytes * scale) for n in base.nodes
                )
            )
            for objective in cost.OBJECTIVES:
                workload = planner.Workload(objective=objective)
                times, plan = [], None
                for _ in range(repeat):
                    start = time.perf_counter()
                    plan = planner.plan_pipeline(profile, cluster, workload=workload)
                    times.append(time.perf_counter() - start)
                tracemalloc.start()
                planner.plan_pipeline(profile, cluster, workload=workload)
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
                assert plan is not None
                print(
                    f"{size:>6} {layers:>6} {objective:>10} {statistics.median(times) * 1e3:>9.1f} "
                    f"{peak / 2**20:>9.1f} {'exact' if plan.exact else 'heuristic':>9}"
                )


# 3. plan quality vs today's splits -----------------------------------------------------


def even_split(
    profile: profiles.ModelProfile, cluster: inventory.Inventory
) -> tuple[list[str], list[int]]:
    nodes = [n.name for n in cluster.nodes][: profile.num_layers]
    count = len(nodes)
    return nodes, [round(profile.num_layers * i / count) for i in range(count + 1)]


def memory_split(
    profile: profiles.ModelProfile, cluster: inventory.Inventory
) -> tuple[list[str], list[int]]:
    total = sum(n.memory_bytes for n in cluster.nodes)
    layers, cumulative = profile.num_layers, 0
    nodes, bounds = [], [0]
    for node in cluster.nodes:
        cumulative += node.memory_bytes
        end = round(layers * cumulative / total)
        if end > bounds[-1]:
            nodes.append(node.name)
            bounds.append(end)
    return nodes, bounds


def describe(costed: cost.ChainCost) -> str:
    fits = "" if costed.fits else " (OOM)"
    return f"{costed.bottleneck_seconds * 1e3:9.2f} {costed.token_latency_seconds * 1e3:9.2f}{fits}"


def compare(cluster_name: str, model: str) -> None:
    profile, cluster = load_profile(model), load_cluster(cluster_name)
    workload = planner.Workload()
    plan = planner.plan_pipeline(profile, cluster, workload=workload)
    latency_plan = planner.plan_pipeline(
        profile, cluster, workload=planner.Workload(objective="latency")
    )
    baselines = {}
    for label, split in (("even split", even_split), ("memory-proportional", memory_split)):
        nodes, bounds = split(profile, cluster)
        baselines[label] = cost.evaluate(profile, cluster, workload, nodes=nodes, bounds=bounds)
    print(
        f"\n### {model} on {cluster_name} ({len(cluster.nodes)} nodes; S={workload.max_sequences}, "
        f"C={workload.max_context_tokens})"
    )
    print(f"{'split':<28} {'stages':>6} {'T ms':>9} {'Λ ms':>9}")
    print(
        f"{'planner (throughput)':<28} {len(plan.stages):>6} "
        f"{plan.bottleneck_seconds * 1e3:9.2f} {plan.token_latency_seconds * 1e3:9.2f}"
    )
    print(
        f"{'planner (latency)':<28} {len(latency_plan.stages):>6} "
        f"{latency_plan.bottleneck_seconds * 1e3:9.2f} "
        f"{latency_plan.token_latency_seconds * 1e3:9.2f}"
    )
    for label, costed in baselines.items():
        print(f"{label:<28} {len(costed.stages):>6} {describe(costed)}")
    fitting = [c.bottleneck_seconds for c in baselines.values() if c.fits]
    if fitting:
        ratio = min(fitting) / plan.bottleneck_seconds
        print(f"bottleneck ratio, better fitting baseline / planner: {ratio:.2f}x")
    else:
        print("bottleneck ratio: no baseline fits in memory; the planner's plan does")
    for label, costed in baselines.items():
        if costed.fits:
            ratio = costed.token_latency_seconds / latency_plan.token_latency_seconds
            print(f"token latency ratio, {label} / planner (latency): {ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--only", choices=("time", "layers", "quality"), help="run one section of the three"
    )
    args = parser.parse_args()
    if args.only in (None, "time"):
        time_planning(args.repeat)
    if args.only in (None, "layers"):
        time_layers(args.repeat)
    if args.only not in (None, "quality"):
        return
    print(
        "\n## plan quality vs today's splits "
        "(T = bottleneck per step at batch S, Λ = token latency)"
    )
    for cluster_name, model in (
        ("jetson-cloud.yaml", "Llama-2-7B"),
        ("pi-nuc-homelab.yaml", "TinyLlama-1.1B"),
        ("pi-nuc-homelab.yaml", "Qwen2.5-7B"),
        ("four-gpu-rack.yaml", "Llama-3-70B"),
        ("fleet-200.yaml", "Llama-3-70B"),
    ):
        compare(cluster_name, model)


if __name__ == "__main__":
    main()
