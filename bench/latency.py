"""Time to first token with and without chunked prefill, and single-conversation decode
speed with and without prompt-lookup speculation, on the real model over shaped links.

    sudo PYTHONPATH=operator:stage_image:. python bench/latency.py ttft \
        [--stages 4] [--mbps 100] [--prompts 256,1024] [--chunk 128] [--repeats 2]
    sudo PYTHONPATH=operator:stage_image:. python bench/latency.py decode \
        [--stages 2] [--mbps 1000] [--new 64]

`ttft`: the stages run in network namespaces (tests/support/emulated.py: one per stage,
each with an equal share of the machine's cores as its CPU budget, a `tc tbf`-shaped veth
per pair at `--mbps`); two pipelines of the same model and split, one with
`prefillChunkTokens` 0 (a prompt in one step per stage) and one with `--chunk`, are
run one after the other (side by side they would share the cores) and asked for one token
of the same prompts; the client times each request. It prints the measured TTFT of each
and the load average.

`decode`: one conversation at a time on code-editing and summarising prompts, greedy,
`--new` tokens, with `speculation` off and `ngram`, alternating; tokens/s from the
client's wall time, and the acceptance counters of stage 0's /metrics.

Round-trip time is not emulated here (netem is absent and the delaying relay was not
built): every figure is at the veths' own RTT (well under 1 ms). Prints figures; asserts
nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.dataplane import pipelines
from tests.support import emulated

NAME = "SmolLM2-135M-Instruct"
CODE = """def load(path):
    with open(path) as handle:
        lines = handle.readlines()
    rows = []
    for line in lines:
        fields = line.strip().split(",")
        rows.append(fields)
    return rows


def total(rows, column):
    result = 0
    for row in rows:
        result += float(row[column])
    return result
"""
ARTICLE = (
    "The city council met on Tuesday to discuss the new bus routes. The council agreed "
    "that the number 12 bus will run every ten minutes in the morning and every twenty "
    "minutes in the evening. The number 7 bus will stop at the hospital and the station. "
    "The changes start next month, and the council will review them after six months."
)
DECODE_PROMPTS = {
    "code-edit": f"Rename the variable rows to records in this code:\n{CODE}\nThe code "
    "with rows renamed to records:\n",
    "summary": f"Article: {ARTICLE}\nRepeat the key facts of the article in one paragraph:\n",
}


def model_dir() -> Path:
    from llmpipe_stage import gguf_convert, models

    return gguf_convert.ensure_converted(models.ensure_default_model(), models.CACHE_DIR / "gguf")


def prompt_ids(directory: Path, tokens: int) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    ids: list[int] = []
    while len(ids) < tokens:
        ids += tokenizer.encode(ARTICLE + " " + CODE)
    return ids[:tokens]


def request(pipeline: pipelines.Pipeline, prompt: list[int] | str, n: int) -> float:
    started = time.perf_counter()
    status, body = pipelines.http_json(
        f"{pipeline.base_url}/v1/completions",
        {"model": NAME, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True},
        timeout=600,
    )
    if status != 200:
        raise RuntimeError(f"HTTP {status}: {body}")
    return time.perf_counter() - started


def counter(pipeline: pipelines.Pipeline, name: str) -> float:
    text = urllib.request.urlopen(f"{pipeline.base_url}/metrics", timeout=10).read().decode()
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def start(
    directory: Path,
    run_dir: Path,
    *,
    stages: int,
    workload: dict[str, Any],
    cluster: emulated.Cluster | None,
    max_context: int,
) -> pipelines.Pipeline:
    options: dict[str, Any] = {}
    if cluster is not None:
        options = {
            "hosts": [node.address for node in cluster.nodes],
            "prefixes": [node.prefix() for node in cluster.nodes],
        }
    return pipelines.Pipeline.start(
        directory,
        run_dir,
        stages=stages,
        name=NAME,
        max_context=max_context,
        plaintext=True,
        workload=workload,
        ready_timeout=600,
        **options,
    )


def ttft(args: argparse.Namespace) -> None:
    directory = model_dir()
    cores = os.cpu_count() or 1
    description = {
        "nodes": [
            {"name": f"s{i}", "cpus": cores / args.stages, "memory": "4Gi", "tier": "edge"}
            for i in range(args.stages)
        ],
        "defaultMbps": args.mbps,
    }
    lengths = [int(p) for p in args.prompts.split(",")]
    prompts = {n: prompt_ids(directory, n) for n in lengths}
    results: dict[tuple[int, int], list[float]] = {}
    for chunk in (0, args.chunk):  # one pipeline at a time: both would share the cores
        cluster = emulated.Cluster.start(description)
        pipeline = None
        try:
            with tempfile.TemporaryDirectory() as run:
                pipeline = start(
                    directory,
                    Path(run),
                    stages=args.stages,
                    workload={"prefillChunkTokens": chunk},
                    cluster=cluster,
                    max_context=max(lengths) + 16,
                )
                request(pipeline, prompts[lengths[0]][:32], 1)  # warm up
                for _ in range(args.repeats):
                    for n in lengths:
                        results.setdefault((chunk, n), []).append(request(pipeline, prompts[n], 1))
                pipeline.stop()
        finally:
            if pipeline is not None:
                pipeline.stop()
            cluster.stop()
    print(
        f"stages {args.stages}, {args.mbps:g} Mbit/s per hop, each stage {cores / args.stages:g}"
        f" cores, chunk {args.chunk}; {os.getloadavg()[0]:.1f} load average"
    )
    print("prompt  TTFT whole (s)        TTFT chunked (s)      speed-up")
    for n in lengths:
        whole, cut = results[(0, n)], results[(args.chunk, n)]
        print(
            f"{n:6d}  {' '.join(f'{t:6.2f}' for t in whole):20s}  "
            f"{' '.join(f'{t:6.2f}' for t in cut):20s}  {min(whole) / min(cut):.2f}x"
        )


def decode(args: argparse.Namespace) -> None:
    directory = model_dir()
    figures: dict[tuple[str, str], list[float]] = {}
    accepted: dict[str, tuple[float, float]] = {}
    for mode in ("off", "ngram"):
        with tempfile.TemporaryDirectory() as run:
            pipeline = start(
                directory,
                Path(run),
                stages=args.stages,
                workload={"speculation": mode},
                cluster=None,
                max_context=1024,
            )
            try:
                request(pipeline, "Hello", 4)
                for _ in range(args.repeats):
                    for kind, text in DECODE_PROMPTS.items():
                        before = request(pipeline, text, 1)  # the prefill alone
                        seconds = request(pipeline, text, args.new) - before
                        figures.setdefault((mode, kind), []).append((args.new - 1) / seconds)
                accepted[mode] = (
                    counter(pipeline, "llmpipe_draft_tokens_total"),
                    counter(pipeline, "llmpipe_accepted_draft_tokens_total"),
                )
            finally:
                pipeline.stop()
    print(
        f"stages {args.stages} on loopback, {args.new} greedy tokens per conversation; "
        f"{os.getloadavg()[0]:.1f} load average"
    )
    print("prompt      off tok/s       ngram tok/s     speed-up")
    for kind in DECODE_PROMPTS:
        off, on = figures[("off", kind)], figures[("ngram", kind)]
        print(
            f"{kind:10s}  {' '.join(f'{v:5.1f}' for v in off):14s}  "
            f"{' '.join(f'{v:5.1f}' for v in on):14s}  {max(on) / max(off):.2f}x"
        )
    drafted, kept = accepted["ngram"]
    rate = kept / drafted if drafted else 0.0
    print(f"draft tokens {drafted:g}, accepted {kept:g} ({rate:.0%})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    first = commands.add_parser("ttft")
    first.add_argument("--stages", type=int, default=4)
    first.add_argument("--mbps", type=float, default=100)
    first.add_argument("--prompts", default="256,1024")
    first.add_argument("--chunk", type=int, default=128)
    first.add_argument("--repeats", type=int, default=2)
    second = commands.add_parser("decode")
    second.add_argument("--stages", type=int, default=2)
    second.add_argument("--new", type=int, default=64)
    second.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.command == "ttft":
        reason = emulated.available()
        if reason:
            print(f"bench/latency.py: {reason}", file=sys.stderr)
            return 2
        ttft(args)
    else:
        decode(args)
    subprocess.run(["uptime"], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
