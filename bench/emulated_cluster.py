"""Plans from measured facts on an emulated heterogeneous cluster, run for real.

    sudo PYTHONPATH=operator:stage_image:. python bench/emulated_cluster.py \
        [--cluster bench/clusters/hetero.yaml] [--layers 24] [--sequences 24] [--new 24]

Builds the cluster file's "nodes" (tests/support/emulated.py: network namespaces with
cgroup CPU budgets, a tbf-shaped link per pair), then:

1. runs the node probe (`llmpipe_stage.probe`) inside every node, reads it with the
   operator's own code (`reconcile.probes`: facts, then one link pair at a time), writes
   the `llmpipe.io/measured` / `llmpipe.io/links` annotations onto Node objects
   (`planning.measured.node_annotations`) and prints probe vs configured figures
   (compute: the node's CPU share x a one-core reference probe run beside it);
2. plans over those Nodes exactly as the operator does (`planning.live` ->
   `planning.planner`), and costs an even split and a memory-proportional split with the
   same cost model;
3. runs each split as real stage processes placed in the nodes (same model, same load:
   `--sequences` concurrent completions of `--new` tokens) and prints estimated vs
   measured tokens/s and per-stage compute time per micro-batch;
4. recalibration: with the planner's plan running, cuts one node's CPU budget, re-probes,
   lets the operator-side logic decide (annotations written only beyond the margin, the
   running plan re-costed on the new facts, hysteresis) and runs the new plan.

For every stage and decode window it also reads what the stage's node used: the stage
process's CPU seconds per wall second against the node's budget (flagged OVER BUDGET when
the quota did not hold), the share of CFS periods in which the quota ran out, and the CPU
per step against the estimate's (estimate x cpus), and the machine's steal time.

The whole run takes 15-20 minutes on 2 shared cores; to keep each run short, split it into
invocations that share one `--save` file:

    ... bench/emulated_cluster.py --skip-runs --save run.json          # probe and plan
    ... bench/emulated_cluster.py --facts run.json --splits planner --save run.json
    ... (even, memory-proportional, recalibration likewise; --reprobe re-probes a split's
        nodes just before it and costs it on those figures too)
    ... bench/emulated_cluster.py --recost run.json                    # no run: re-cost

Needs root, `ip`, `tc` and cgroup v1 cpu. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from llmpipe_cli import modelfiles
from llmpipe_operator.planning import cost, live, measured, planner, replan
from llmpipe_operator.reconcile import probes
from tests.dataplane import pipelines
from tests.support import emulated

ROOT = Path(__file__).resolve().parents[1]
PROBE_PORT = emulated.PROBE_PORT
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS = 512, 1408, 8, 4
"""The bench model's layer shape (24 layers, float32, random weights)."""
MODEL_SHAPE = f"{HIDDEN},{INTERMEDIATE},{HEADS},{KV_HEADS}"


# -- 1. probe ------------------------------------------------------------------------------
def start_probe(
    node: emulated.Node, *, seconds: float, layer_shape: str | None
) -> subprocess.Popen[bytes]:
    command = emulated.probe_command(
        node.prefix(), host=node.address, seconds=seconds, layer_shape=layer_shape
    )
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def reference_facts(
    cluster: emulated.Cluster, *, seconds: float, layer_shape: str | None
) -> dict[str, Any]:
    """One whole core: what a node's `cpus` is a share of."""
    command = emulated.probe_command(
        cluster.reference_prefix(), seconds=seconds, layer_shape=layer_shape
    )
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return dict(json.loads(done.stdout))


async def read_probes(
    cluster: emulated.Cluster, *, pairs: bool, only: str | None = None
) -> tuple[dict[str, dict[str, Any]], dict[tuple[str, str], dict[str, float]]]:
    """The operator's read of the probes: facts (waiting for every probe's first
    measurement), then, with `pairs`, every link one pair at a time."""
    found = {
        n.name: probes.Probe(node=n.name, address=n.address)
        for n in cluster.nodes
        if only in (None, n.name)
    }
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        facts: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + 180
        while len(facts) < len(found) and time.monotonic() < deadline:
            facts = await probes.collect_facts(session, found, port=PROBE_PORT)
            await asyncio.sleep(1)
        links = {}
        if pairs:
            due = probes.due_pairs(sorted(facts), last_measured={}, now=0, every_seconds=1)
            links = await probes.measure_pairs(session, found, facts, due, port=PROBE_PORT)
    return facts, links


def node_objects(cluster: emulated.Cluster) -> dict[str, dict[str, Any]]:
    """The Nodes a live cluster would list: allocatable memory, tier, no compute labels."""
    return {
        n.name: {
            "metadata": {
                "name": n.name,
                "labels": {live.LABEL_TIER: str(n.facts.get("tier", "cloud"))},
                "annotations": {},
            },
            "spec": {},
            "status": {
                "allocatable": {"memory": str(n.facts["memory"])},
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }
        for n in cluster.nodes
    }


def write_round(
    nodes: dict[str, dict[str, Any]],
    facts: dict[str, dict[str, Any]],
    links: dict[tuple[str, str], dict[str, float]],
    *,
    margin: float,
) -> list[str]:
    """What the operator's probe round writes; returns the nodes it wrote."""
    written = []
    for name, node in nodes.items():
        out = measured.node_annotations(
            node, facts=facts.get(name), links=probes.links_of(name, links), margin=margin
        )
        if out:
            node["metadata"]["annotations"].update(out)
            written.append(name)
    return written


def print_probe_table(
    cluster: emulated.Cluster,
    facts: dict[str, dict[str, Any]],
    links: dict[tuple[str, str], dict[str, float]],
    reference: float,
) -> None:
    print(f"\none-core reference probe: {reference * 1e3:.1f} GFLOP/s")
    print(f"{'node':6} {'cpus':>5} {'configured':>12} {'probe':>10} {'error':>7}   memory GB/s")
    for node in cluster.nodes:
        configured = node.cpus * reference
        got = float(facts[node.name]["tflops"])
        bandwidth = facts[node.name]["memoryBandwidthGBps"]
        print(
            f"{node.name:6} {node.cpus:5.2f} {configured * 1e3:9.1f} GF {got * 1e3:7.1f} GF "
            f"{got / configured - 1:+7.1%}   {bandwidth:.1f}"
        )
    print(f"{'link':12} {'configured':>10} {'probe':>10} {'error':>7} {'rtt ms':>7}")
    for (a, b), value in sorted(links.items()):
        configured = cluster.mbps(a, b)
        print(
            f"{a + '-' + b:12} {configured:7.0f} Mb {value['mbps']:7.1f} Mb "
            f"{value['mbps'] / configured - 1:+7.1%} {value['rttMs']:7.3f}"
        )


def print_fixed_costs(
    cluster: emulated.Cluster, facts: dict[str, dict[str, Any]], references: list[dict[str, Any]]
) -> None:
    """Each node's fixed costs and product rate at 8 tokens against the one-core reference's
    divided by the node's CPU share (what a quota of that share should give)."""
    keys = ("layerStepSeconds", "stepSeconds", "hopSeconds")
    one_core = {k: statistics.mean(float(r[k]) for r in references) for k in keys}
    one_core["product8"] = statistics.mean(
        float(r["productSecondsPerByte"]["8"]) for r in references
    )
    print("\nfixed costs, one core: " + ", ".join(f"{k} {v:.3g}" for k, v in one_core.items()))
    for node in cluster.nodes:
        got = {k: float(facts[node.name][k]) for k in keys}
        got["product8"] = float(facts[node.name]["productSecondsPerByte"]["8"])
        print(
            f"{node.name:6} "
            + "  ".join(
                f"{k} {v:.3g} ({v * node.cpus / one_core[k] - 1:+.0%})" for k, v in got.items()
            )
        )


# -- 2. plans ------------------------------------------------------------------------------
def split_plan(
    profile: Any, inventory: Any, workload: cost.Workload, nodes: list[str], bounds: list[int]
) -> dict[str, Any]:
    costed = cost.evaluate(profile, inventory, workload, nodes=nodes, bounds=bounds)
    plan = planner._plan(costed, workload, exact=True, lower_bound=costed.bottleneck_seconds)
    return plan.to_dict()


def proportional_bounds(weights: list[float], layers: int) -> list[int]:
    """Layers in proportion to `weights`, each stage at least one layer."""
    total, bounds, acc = sum(weights), [0], 0.0
    for w in weights[:-1]:
        acc += w
        bounds.append(max(bounds[-1] + 1, round(layers * acc / total)))
    bounds.append(layers)
    return bounds


# -- 3. run a split ------------------------------------------------------------------------
def run_split(
    cluster: emulated.Cluster, model_dir: Path, plan: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    order = [s["node"] for s in plan["stages"]]
    nodes = [cluster.node(name) for name in order]
    run_dir = Path(tempfile.mkdtemp(prefix="llmpipe-emu-"))
    pipeline = pipelines.Pipeline.start(
        model_dir,
        run_dir,
        stages=len(nodes),
        max_sequences=args.sequences,
        max_context=args.prompt + args.new + 8,
        hosts=[n.address for n in nodes],
        prefixes=[n.prefix() for n in nodes],
        plaintext=True,
        plan=plan,
        ready_timeout=300,
    )
    try:
        load(pipeline, sequences=2, new=4, prompt=args.prompt)  # warm-up
        windows = []
        for _ in range(args.windows):
            window = decode_window(
                pipeline,
                sequences=args.sequences,
                new=args.new,
                prompt=args.prompt,
                marks=lambda: usage_marks(pipeline, nodes),
            )
            before, after = window["before"], window["after"]
            windows.append(
                {
                    "tokensPerSecond": window["tokensPerSecond"],
                    "wholeTokensPerSecond": window["wholeTokensPerSecond"],
                    "stages": [
                        {
                            "computeSeconds": (after[i][0] - before[i][0])
                            / max(after[i][2] - before[i][2], 1),
                            "batchTokens": (after[i][1] - before[i][1])
                            / max(after[i][2] - before[i][2], 1),
                            **usage(window["marksBefore"], window["marksAfter"], i)
                            | {"steps": after[i][2] - before[i][2], "cpus": nodes[i].cpus},
                        }
                        for i in range(len(nodes))
                    ],
                    "stealShare": steal_share(window["marksBefore"], window["marksAfter"]),
                }
            )
        return {**median_window(windows), "windows": windows, "pipeline": pipeline}
    except BaseException:  # Ctrl-C too: never leave stage processes in the namespaces
        pipeline.stop()
        raise


def usage_marks(pipeline: pipelines.Pipeline, nodes: list[emulated.Node]) -> dict[str, Any]:
    """What each stage's node used so far: the stage process's CPU seconds and its node
    cgroup's throttling counters; and the machine's steal time, on a monotonic clock."""
    return {
        "wall": time.monotonic(),
        "steal": emulated.steal_seconds(),
        "stages": [
            {"cpu": emulated.process_cpu_seconds(process.pid), **node.cpu_stat()}
            for process, node in zip(pipeline.processes, nodes, strict=True)
        ],
    }


def usage(before: dict[str, Any], after: dict[str, Any], index: int) -> dict[str, float]:
    """Stage `index`'s CPU use over a window: `cpuShare` (CPU seconds per wall second: at
    most the node's budget when its quota holds), `cpuSeconds`, `throttledShare` (the share
    of CFS periods in which the quota ran out) and `throttledSeconds`."""
    wall = after["wall"] - before["wall"]
    a, b = before["stages"][index], after["stages"][index]
    periods = b["nr_periods"] - a["nr_periods"]
    return {
        "wallSeconds": wall,
        "cpuSeconds": b["cpu"] - a["cpu"],
        "cpuShare": (b["cpu"] - a["cpu"]) / wall,
        "throttledShare": (b["nr_throttled"] - a["nr_throttled"]) / max(periods, 1),
        "throttledSeconds": (b["throttled_time"] - a["throttled_time"]) / 1e9,
    }


def steal_share(before: dict[str, Any], after: dict[str, Any]) -> float:
    """The machine's steal time over a window, in CPUs (0.5: half a core taken by the host)."""
    return float((after["steal"] - before["steal"]) / (after["wall"] - before["wall"]))


def median_window(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over the windows (one window: its figures): the other sessions'
    bursts on the shared cores move single windows by 15-30 %."""

    def median(values: list[float]) -> float:
        return float(statistics.median(values))

    count = len(windows[0]["stages"])
    return {
        "tokensPerSecond": median([w["tokensPerSecond"] for w in windows]),
        "wholeTokensPerSecond": median([w["wholeTokensPerSecond"] for w in windows]),
        "stealShare": median([w.get("stealShare", 0.0) for w in windows]),
        "stages": [
            {
                key: median([w["stages"][i][key] for w in windows])
                for key in ("computeSeconds", "batchTokens", "cpuShare", "throttledShare", "cpus")
                if key in windows[0]["stages"][i]
            }
            | (
                {"cpuPerStep": median([cpu_per_step(w["stages"][i]) for w in windows])}
                if "cpuSeconds" in windows[0]["stages"][i]
                else {}
            )
            for i in range(count)
        ],
    }


def cpu_per_step(stage: dict[str, float]) -> float:
    """The stage process's CPU seconds per step over a window (its whole process: the
    step's own CPU plus its server's)."""
    return stage["cpuSeconds"] / max(stage["steps"], 1)


def decode_window(
    pipeline: pipelines.Pipeline,
    *,
    sequences: int,
    new: int,
    prompt: int,
    marks: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """`sequences` streamed completions at once; the window opens when every one has its
    first token (the prefills are over) and closes when all are done: what the cost model's
    round estimates (decode at S sequences in flight; the prefill is TTFT's). `marks`, when
    given, is read at the opening and the closing too (`marksBefore`, `marksAfter`)."""
    first = threading.Barrier(sequences + 1, timeout=900)
    url = f"{pipeline.base_url}/v1/completions"

    def one(seed: int) -> int:
        body = {
            "model": "tiny",
            "prompt": [3 + (seed * 7 + i) % 250 for i in range(prompt)],
            "max_tokens": new,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        request = urllib.request.Request(
            url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        events = 0
        with urllib.request.urlopen(request, timeout=900) as reply:
            for line in reply:
                if line.startswith(b"data: {"):
                    events += 1
                    if events == 1:
                        first.wait()
        if events == 0:
            first.wait()
        return events

    with ThreadPoolExecutor(sequences) as pool:
        started = time.perf_counter()
        futures = [pool.submit(one, i) for i in range(sequences)]
        first.wait()
        marked = marks() if marks else None
        before, opened, generated = stage_metrics(pipeline), time.perf_counter(), tokens(pipeline)
        produced = sum(f.result() for f in futures)
        closed = time.perf_counter()
        after, generated = stage_metrics(pipeline), tokens(pipeline) - generated
    return {
        "tokensPerSecond": generated / (closed - opened),
        "wholeTokensPerSecond": produced / (closed - started),
        "before": before,
        "after": after,
        "marksBefore": marked,
        "marksAfter": marks() if marks else None,
    }


def tokens(pipeline: pipelines.Pipeline) -> float:
    """Stage 0's `llmpipe_generated_tokens` counter."""
    url = f"http://{pipeline.host(0)}:{pipeline.http_ports[0]}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    found = re.search(r"^llmpipe_generated_tokens_total(?:\{[^}]*\})? (\S+)$", text, re.M)
    return float(found[1]) if found else 0.0


def load(pipeline: pipelines.Pipeline, *, sequences: int, new: int, prompt: int) -> float:
    def one(seed: int) -> int:
        body = {
            "model": "tiny",
            "prompt": [3 + (seed * 7 + i) % 250 for i in range(prompt)],
            "max_tokens": new,
            "temperature": 0,
            "ignore_eos": True,
        }
        status, reply = pipelines.http_json(
            f"{pipeline.base_url}/v1/completions", body, timeout=900
        )
        if status != 200:
            raise RuntimeError(f"completion failed: {status} {reply}")
        return int(reply["usage"]["completion_tokens"])

    with ThreadPoolExecutor(sequences) as pool:
        started = time.perf_counter()
        produced = sum(pool.map(one, range(sequences)))
        return produced / (time.perf_counter() - started)


_SERIES = re.compile(
    r'^(llmpipe_stage_(?:compute_seconds|batch_tokens)_(?:sum|count))\{stage="\d+"\} (\S+)$'
)


def stage_metrics(pipeline: pipelines.Pipeline) -> list[tuple[float, float, float]]:
    """(compute seconds sum, batch tokens sum, micro-batches) per stage from /metrics."""
    out = []
    for i in range(pipeline.num_stages):
        url = f"http://{pipeline.host(i)}:{pipeline.http_ports[i]}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        values = {m[1]: float(m[2]) for line in text.splitlines() if (m := _SERIES.match(line))}
        out.append(
            (
                values.get("llmpipe_stage_compute_seconds_sum", 0.0),
                values.get("llmpipe_stage_batch_tokens_sum", 0.0),
                values.get("llmpipe_stage_compute_seconds_count", 0.0),
            )
        )
    return out


def estimated_stage_seconds(
    profile: Any, inventory: Any, workload: cost.Workload, stage: dict[str, Any], batch: float
) -> float:
    """Cost model compute time of one micro-batch of `batch` tokens on this stage."""
    start, end = stage["layerStart"], stage["layerEnd"]
    return cost.compute_seconds(
        profile,
        inventory.node(stage["node"]),
        cost.weight_bytes(profile, start, end),
        batch=batch,
        workload=workload,
        layers=end - start,
    )


def report(
    name: str,
    plan: dict[str, Any],
    result: dict[str, Any],
    profile: Any,
    inventory: Any,
    workload: cost.Workload,
) -> None:
    est, got = plan["estTokensPerSecond"], result["tokensPerSecond"]
    layout = " ".join(f"{s['node']}[{s['layerStart']},{s['layerEnd']})" for s in plan["stages"])
    micro = cost.micro_batch(workload, len(plan["stages"]))
    print(f"\n{name}: {layout}  (load average {load_average()})")
    windows = result.get("windows", [])
    spread = ", ".join(f"{w['tokensPerSecond']:.1f}" for w in windows)
    print(
        f"  tokens/s (decode window, median of {len(windows)}: {spread}) estimated {est:7.2f}  "
        f"measured {got:7.2f} ({got / est - 1:+.0%}); whole load incl. prefill "
        f"{result['wholeTokensPerSecond']:.2f}"
    )
    for stage, seen in zip(plan["stages"], result["stages"], strict=True):
        # the estimate at the micro-batch the stage ran (a worker merges the micro-batches
        # queued for it, so a slow stage past stage 0 runs more than S / K tokens a step),
        # and at the plan's S / K
        ran = estimated_stage_seconds(profile, inventory, workload, stage, seen["batchTokens"])
        planned = estimated_stage_seconds(profile, inventory, workload, stage, micro)
        took = seen["computeSeconds"]
        index = stage["index"]
        each = ", ".join(f"{w['stages'][index]['computeSeconds'] * 1e3:.0f}" for w in windows)
        print(
            f"  stage {index} on {stage['node']:5}: {seen['batchTokens']:5.1f} "
            f"tokens/step: estimated {ran * 1e3:7.1f} ms, measured {took * 1e3:7.1f} ms "
            f"({took / ran - 1:+.0%}; windows {each}); at S/K = {micro:.1f}: "
            f"{planned * 1e3:7.1f} ms"
        )
        if "cpuShare" in seen:
            print("    " + budget_line(seen, ran))
    if "stealShare" in result:
        print(f"  steal (the host's share of this machine's CPUs): {result['stealShare']:.3f} CPUs")


def budget_line(seen: dict[str, Any], estimated: float) -> str:
    """Did the node's quota hold (the stage process's CPU per wall second against the
    node's budget), and how much CPU a step took against the estimate's (the estimate is
    wall time at the node's budget, so its CPU is estimate x cpus)."""
    share, cpus = seen["cpuShare"], seen["cpus"]
    verdict = "OVER BUDGET: the quota did not hold" if share > cpus * 1.05 else "within"
    return (
        f"CPU {share:.3f} of {cpus:g} cpus ({share / cpus - 1:+.0%}, {verdict}); quota ran "
        f"out in {seen['throttledShare']:.0%} of periods; CPU per step "
        f"{seen['cpuPerStep'] * 1e3:.1f} ms vs estimate x cpus {estimated * cpus * 1e3:.1f} ms "
        f"({seen['cpuPerStep'] / (estimated * cpus) - 1:+.0%})"
    )


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def recost(record: dict[str, Any], profile: Any, workload: cost.Workload) -> None:
    """The saved splits' estimates again, from the saved Nodes (the re-planned split: the
    Nodes after the slowdown), against the saved measured figures."""
    for name, split in record["splits"].items():
        nodes = record["nodesAfterSlowdown" if name == "re-planned" else "nodes"]
        for label, facts in ((name, nodes), (name + " (fresh probes)", split.get("nodesAtRun"))):
            if facts is None:
                continue
            inventory = live.build_inventory(
                list(facts.values()), eligibility=live.Eligibility()
            ).inventory
            plan = recost_split(profile, inventory, workload, split["plan"])
            report(label, plan, split, profile, inventory, workload)


# -- main ----------------------------------------------------------------------------------
SPLITS = ("planner", "even", "memory-proportional", "recalibration")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cluster", type=Path, default=ROOT / "bench/clusters/hetero.yaml")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--sequences", type=int, default=24)
    parser.add_argument("--prompt", type=int, default=8)
    parser.add_argument("--new", type=int, default=48)
    parser.add_argument("--probe-seconds", type=float, default=2.0)
    parser.add_argument("--slow-node", default="fast", help="node whose CPU is cut in step 4")
    parser.add_argument("--slow-cpus", type=float, default=0.1)
    parser.add_argument("--skip-runs", action="store_true", help="probe and plan only")
    parser.add_argument(
        "--splits",
        default=",".join(SPLITS),
        help=f"which of {','.join(SPLITS)} to run (comma-separated; default all)",
    )
    parser.add_argument(
        "--facts",
        type=Path,
        help="no probe: plan from a --save file's Nodes (a run split into invocations that "
        "each stay short: probe with --skip-runs --save F, then --facts F --splits ... "
        "--save F, which adds the splits to F)",
    )
    parser.add_argument(
        "--reprobe",
        action="store_true",
        help="probe a split's nodes again just before it runs and cost it on those figures "
        "too (the plans stay those of the first probe round)",
    )
    parser.add_argument(
        "--save", type=Path, help="write the facts, plans and measured figures (JSON) here"
    )
    parser.add_argument(
        "--recost",
        type=Path,
        help="no run: re-cost a --save file's splits with this code's cost model (same "
        "probe facts, same measured figures) and print the comparison",
    )
    parser.add_argument(
        "--windows", type=int, default=3, help="decode windows per split (medians reported)"
    )
    parser.add_argument(
        "--layer-shape",
        default=MODEL_SHAPE,
        help="the probes' product-curve layer (H,I,HEADS,KV; the model's; '': the probe's default)",
    )
    args = parser.parse_args()
    wanted = [] if args.skip_runs else [x for x in args.splits.split(",") if x]
    unknown = sorted(set(wanted) - set(SPLITS))
    if unknown:
        parser.error(f"unknown --splits {unknown}")
    from llmpipe_stage import demo

    work = Path(tempfile.mkdtemp(prefix="llmpipe-emu-model-"))
    model_dir = demo.write_model(
        work / "model", family="llama", hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
        num_hidden_layers=args.layers, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        max_position_embeddings=1024,
    )  # fmt: skip
    profile = modelfiles.load_profile(model_dir)
    workload = cost.Workload(
        max_sequences=args.sequences,
        max_context_tokens=args.prompt + args.new + 8,
        runtime_overhead_bytes=256 * 2**20,
    )
    if args.recost:
        recost(json.loads(args.recost.read_text()), profile, workload)
        return 0
    description = yaml.safe_load(args.cluster.read_text())
    record: dict[str, Any] = {"splits": {}}
    if args.facts:
        record = json.loads(args.facts.read_text())
        record.setdefault("splits", {})
    record["args"] = vars(args) | {"cluster": str(args.cluster)}

    def save() -> None:
        if args.save:
            args.save.write_text(json.dumps(record, indent=1, default=str))

    cluster = emulated.Cluster.start(description)
    running: dict[str, subprocess.Popen[bytes]] = {}
    try:
        if args.facts:
            nodes = record["nodes"]
            print(f"probe facts from {args.facts} (measured {record.get('probedAt', '?')})")
        else:
            nodes = probe_phase(cluster, args, running, record)
            save()
        inventory = live.build_inventory(
            list(nodes.values()), eligibility=live.Eligibility()
        ).inventory
        # 2. plans
        chosen = planner.plan_pipeline(profile, inventory, workload=workload).to_dict()
        names = [n.name for n in cluster.nodes]
        even = split_plan(
            profile,
            inventory,
            workload,
            names,
            proportional_bounds([1.0] * len(names), args.layers),
        )
        memory = [float(n.memory_bytes) for n in (inventory.node(x) for x in names)]
        by_memory = split_plan(
            profile, inventory, workload, names, proportional_bounds(memory, args.layers)
        )
        plans = {"planner": chosen, "even": even, "memory-proportional": by_memory}
        for name, plan in plans.items():
            layout = " ".join(
                f"{s['node']}[{s['layerStart']},{s['layerEnd']})" for s in plan["stages"]
            )
            print(f"{name:20} est {plan['estTokensPerSecond']:7.2f} tok/s  {layout}")
        # 3. run each split
        for name, plan in plans.items():
            if name not in wanted:
                continue
            fresh = None
            if args.reprobe:
                fresh = reprobe(cluster, args, [s["node"] for s in plan["stages"]], nodes)
            result = run_split(cluster, model_dir, plan, args)
            result.pop("pipeline").stop()
            report(name, plan, result, profile, inventory, workload)
            record["splits"][name] = {"plan": plan, **result, "at": time.time()}
            if fresh is not None:
                fresh_inventory = live.build_inventory(
                    list(fresh.values()), eligibility=live.Eligibility()
                ).inventory
                replanned = recost_split(profile, fresh_inventory, workload, plan)
                print("  the same split costed on the probes run just before it:")
                report(
                    name + " (fresh probes)", replanned, result, profile, fresh_inventory, workload
                )
                record["splits"][name]["nodesAtRun"] = fresh
            save()
        measured_rates = {
            name: split["tokensPerSecond"]
            for name, split in record["splits"].items()
            if name in plans
        }
        if len(measured_rates) == len(plans):
            better = max(measured_rates["even"], measured_rates["memory-proportional"])
            print(
                f"\nplanner / better baseline, measured: {measured_rates['planner'] / better:.2f}x"
            )
        # 4. recalibration: the planner's plan runs; one node slows down
        if "recalibration" in wanted:
            recalibrate(
                cluster, model_dir, chosen, json.loads(json.dumps(nodes)), profile, workload,
                args, running, record,
            )  # fmt: skip
            save()
        if args.save:
            print(f"\nfacts, plans and measured figures saved to {args.save}")
    finally:
        for process in running.values():
            process.terminate()
            process.wait()
        cluster.stop()
    return 0


def reprobe(
    cluster: emulated.Cluster,
    args: argparse.Namespace,
    names: list[str],
    nodes: dict[str, dict[str, Any]],
) -> dict[str, dict[str, Any]]:
    """The split's nodes probed again (compute only, one after another), just before the
    split runs: a copy of `nodes` with those nodes' compute figures replaced (links kept).
    This machine's speed per CPU second drifts by tens of per cent over minutes with the
    other work on its cores (the quota holds, what a CPU second does moves); a real node's
    does not, so a split is costed on figures measured beside it as well."""
    fresh: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(names):
        process = start_probe(
            cluster.node(name), seconds=args.probe_seconds, layer_shape=args.layer_shape
        )
        try:
            found, _ = asyncio.run(read_probes(cluster, pairs=False, only=name))
            fresh.update(found)
        finally:
            process.terminate()
            process.wait()
    copied = json.loads(json.dumps(nodes))
    write_round(copied, fresh, {}, margin=0.0)
    print(
        "re-probed just before the split: "
        + ", ".join(f"{n} {float(fresh[n]['tflops']) * 1e3:.1f} GFLOP/s" for n in fresh)
    )
    return dict(copied)


def recost_split(
    profile: Any, inventory: Any, workload: cost.Workload, plan: dict[str, Any]
) -> dict[str, Any]:
    """`plan`'s layout (nodes and layer ranges) costed on `inventory`."""
    stages = plan["stages"]
    bounds = [s["layerStart"] for s in stages] + [stages[-1]["layerEnd"]]
    return split_plan(profile, inventory, workload, [s["node"] for s in stages], bounds)


def probe_phase(
    cluster: emulated.Cluster,
    args: argparse.Namespace,
    running: dict[str, subprocess.Popen[bytes]],
    record: dict[str, Any],
) -> dict[str, dict[str, Any]]:
    """1. probe every node (one after another), then every link pair; print probe vs
    configured; return the Node objects with the probe round's annotations."""
    print(f"load average before the probes: {load_average()}")
    reference_facts_before = reference_facts(
        cluster, seconds=args.probe_seconds, layer_shape=args.layer_shape
    )
    reference = float(reference_facts_before["tflops"])
    # one node's probe after another: here the "nodes" share this machine's cores, so
    # probes measuring at once would measure each other (real nodes do not share CPUs)
    for node in cluster.nodes:
        running[node.name] = start_probe(
            node, seconds=args.probe_seconds, layer_shape=args.layer_shape
        )
        asyncio.run(read_probes(cluster, pairs=False, only=node.name))
    facts, links = asyncio.run(read_probes(cluster, pairs=True))
    reference_facts_after = reference_facts(
        cluster, seconds=args.probe_seconds, layer_shape=args.layer_shape
    )
    reference_after = float(reference_facts_after["tflops"])
    print(
        f"reference before/after the probes: {reference * 1e3:.1f} / "
        f"{reference_after * 1e3:.1f} GFLOP/s (load average {load_average()})"
    )
    print_probe_table(cluster, facts, links, statistics.mean([reference, reference_after]))
    print_fixed_costs(cluster, facts, [reference_facts_before, reference_facts_after])
    nodes = node_objects(cluster)
    write_round(nodes, facts, links, margin=0.1)
    record.update(
        nodes=json.loads(json.dumps(nodes)),
        probedAt=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        references=[reference_facts_before, reference_facts_after],
        facts=facts,
        links={f"{a}-{b}": value for (a, b), value in links.items()},
        configured={n.name: n.cpus for n in cluster.nodes},
    )
    return nodes


def recalibrate(
    cluster: emulated.Cluster,
    model_dir: Path,
    current: dict[str, Any],
    nodes: dict[str, dict[str, Any]],
    profile: Any,
    workload: cost.Workload,
    args: argparse.Namespace,
    running: dict[str, subprocess.Popen[bytes]],
    record: dict[str, Any],
) -> None:
    slowed = cluster.node(args.slow_node)
    result = run_split(cluster, model_dir, current, args)
    pipeline = result.pop("pipeline")
    try:
        print(
            f"\nrecalibration: {slowed.name} {slowed.cpus} -> {args.slow_cpus} cpus "
            "while the plan runs"
        )
        slowed.set_cpus(args.slow_cpus)
        degraded = decode_window(
            pipeline, sequences=args.sequences, new=args.new, prompt=args.prompt
        )["tokensPerSecond"]
    finally:
        pipeline.stop()
    # the slowed node's next measurement: its scheduled re-measurement, brought forward by
    # restarting its probe (a new probe pod measures at once, like on a joining node)
    if slowed.name in running:
        running[slowed.name].terminate()
        running[slowed.name].wait()
    running[slowed.name] = start_probe(
        slowed, seconds=args.probe_seconds, layer_shape=args.layer_shape
    )
    asyncio.run(read_probes(cluster, pairs=False, only=slowed.name))
    # every probe that runs answers (with --facts only the slowed node's does: the other
    # nodes' figures stay, as when their probe does not answer)
    facts = {}
    for name in running:
        found, _ = asyncio.run(read_probes(cluster, pairs=False, only=name))
        facts.update(found)
    print(
        f"  re-measured {slowed.name}: "
        f"{float(facts[slowed.name]['tflops']) * 1e3:.1f} GFLOP/s at {slowed.cpus} cpus"
    )
    written = write_round(nodes, facts, {}, margin=0.1)
    print(f"  probe round wrote {written or 'nothing'} (margin 10 %)")
    inventory = live.build_inventory(list(nodes.values()), eligibility=live.Eligibility()).inventory
    candidate = planner.plan_pipeline(profile, inventory, workload=workload).to_dict()
    now = replan.reevaluate(current, profile, inventory, workload)
    decision = replan.decide_switch(current, candidate, margin=0.2, current_objective=now)
    print(
        "  running plan re-costed on the new facts: "
        f"{current['bottleneckSeconds'] * 1e3:.0f} -> {now * 1e3:.0f} ms; candidate "
        f"{candidate['bottleneckSeconds'] * 1e3:.0f} ms; switch: {decision.switch} "
        f"({decision.reason})"
    )
    print(
        f"  measured before the switch: {degraded:.2f} tok/s "
        f"(before the slowdown {result['tokensPerSecond']:.2f})"
    )
    record["recalibration"] = {
        "node": slowed.name,
        "cpus": args.slow_cpus,
        "beforeTokensPerSecond": result["tokensPerSecond"],
        "degradedTokensPerSecond": degraded,
        "remeasuredTflops": float(facts[slowed.name]["tflops"]),
        "written": written,
        "recostedSeconds": now,
        "candidateSeconds": candidate["bottleneckSeconds"],
        "switch": decision.switch,
        "reason": decision.reason,
    }
    if decision.switch:
        after = run_split(cluster, model_dir, candidate, args)
        after.pop("pipeline").stop()
        report("re-planned", candidate, after, profile, inventory, workload)
        record["splits"]["re-planned"] = {"plan": candidate, **after, "at": time.time()}
        record["nodesAfterSlowdown"] = json.loads(json.dumps(nodes))
        print(
            f"  measured after the switch: {after['tokensPerSecond']:.2f} tok/s "
            f"({after['tokensPerSecond'] / degraded:.2f}x)"
        )


if __name__ == "__main__":
    sys.exit(main())
