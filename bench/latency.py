"""Time to first token with and without chunked prefill, and single-conversation decode
speed with and without prompt-lookup speculation, on the real model over shaped links.

    sudo PYTHONPATH=operator:stage_image:. python bench/latency.py ttft \
        [--stages 4] [--mbps 100] [--prompts 256,1024] [--chunk 128] [--repeats 2] \
        [--rtt-ms 30]
    sudo PYTHONPATH=operator:stage_image:. python bench/latency.py decode \
        [--stages 2] [--new 64] [--repeats 2] [--rtt-ms 0,30]
    PYTHONPATH=operator:stage_image:. python bench/latency.py relay [--rtt-ms 0,10,30] \
        [--rounds 200]

`ttft`: the stages run in network namespaces (tests/support/emulated.py: one per stage,
each with an equal share of the machine's cores as its CPU budget, a `tc tbf`-shaped veth
per pair at `--mbps`); two pipelines of the same model and split, one with
`prefillChunkTokens` 0 (a prompt in one step per stage) and one with `--chunk`, are
run one after the other (side by side they would share the cores) and asked for one token
of the same prompts; the client times each request. It prints the measured TTFT of each
and the load average.

`decode`: one conversation at a time on code-editing, summarising and open prompts, greedy,
`--new` tokens, with `speculation` off and `ngram` (two pipelines up at once, requests
alternating between them); tokens/s from the client's wall time less the prefill, and the
acceptance counters of stage 0's /metrics. Round-trip time is emulated by a delaying TCP
relay in front of every stage (tests/support/relay.py; netem is absent here): each hop,
the return hop to stage 0 included, takes RTT/2, so one token's trip around a 2-stage
pipeline takes one RTT on top of the compute. `ttft` runs at the veths' own RTT (well
under 1 ms), or with `--rtt-ms` on loopback behind the same relays (no namespaces, so no
rate limit and no CPU quota per stage).

`relay`: the round trip the relay really adds (ping-pong through one relay: median, p90,
max). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.dataplane import pipelines
from tests.support import emulated, relay

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
    # nothing to copy: prompt lookup finds few matches, and those it finds are rejected
    "open": "Write a short, original poem about a lighthouse keeper's winter night.\n",
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
    peer_address: Any = None,
) -> pipelines.Pipeline:
    options: dict[str, Any] = {"peer_address": peer_address}
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
        extra_args=("--step-timeout", "900"),  # a whole 4,096-token prompt on 0.5 core
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
    fronts: list[relay.Relay] = []

    def via(address: str) -> str:
        host, port = address.rsplit(":", 1)
        fronts.append(relay.Relay((host, int(port)), one_way_ms=args.rtt_ms / 2).start())
        return fronts[-1].address

    for chunk in (0, args.chunk):  # one pipeline at a time: both would share the cores
        cluster = None if args.rtt_ms else emulated.Cluster.start(description)
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
                    peer_address=via if args.rtt_ms else None,
                )
                request(pipeline, prompts[lengths[0]][:32], 1)  # warm up
                for _ in range(args.repeats):
                    for n in lengths:
                        results.setdefault((chunk, n), []).append(request(pipeline, prompts[n], 1))
                pipeline.stop()
        finally:
            if pipeline is not None:
                pipeline.stop()
            if cluster is not None:
                cluster.stop()
            for front in fronts:
                front.stop()
            fronts.clear()
    where = (
        f"{args.mbps:g} Mbit/s per hop, each stage {cores / args.stages:g} cores"
        if not args.rtt_ms
        else f"loopback, {args.rtt_ms:g} ms RTT per hop (delaying relays), unshaped"
    )
    print(
        f"stages {args.stages}, {where}, chunk {args.chunk}; {os.getloadavg()[0]:.1f} load average"
    )
    print("prompt  TTFT whole (s)        TTFT chunked (s)      speed-up")
    for n in lengths:
        whole, cut = results[(0, n)], results[(args.chunk, n)]
        print(
            f"{n:6d}  {' '.join(f'{t:6.2f}' for t in whole):20s}  "
            f"{' '.join(f'{t:6.2f}' for t in cut):20s}  {min(whole) / min(cut):.2f}x"
        )


def decode(args: argparse.Namespace) -> None:
    """Both pipelines (speculation off and ngram) are up at once, each stage behind a
    delaying relay; one request at a time, the two modes alternating within each round,
    so a change of load hits both alike. The relays' delay is set per RTT between rounds."""
    directory = model_dir()
    rtts = [float(r) for r in args.rtt_ms.split(",")]
    modes = ("off", "ngram")
    figures: dict[tuple[float, str, str], list[float]] = {}
    drafts: dict[tuple[float, str], tuple[float, float]] = {}  # (rtt, prompt) -> ngram's
    fronts: list[relay.Relay] = []

    def via(address: str) -> str:
        host, port = address.rsplit(":", 1)
        fronts.append(relay.Relay((host, int(port))).start())
        return fronts[-1].address

    started: dict[str, pipelines.Pipeline] = {}
    with tempfile.TemporaryDirectory() as run:
        try:
            for mode in modes:
                started[mode] = pipelines.Pipeline.start(
                    directory,
                    Path(run) / mode,
                    stages=args.stages,
                    name=NAME,
                    max_context=1024,
                    plaintext=True,
                    workload={"speculation": mode},
                    ready_timeout=600,
                    peer_address=via,
                )
            for rtt in rtts:
                for front in fronts:
                    front.delay = rtt / 2000
                for mode in modes:
                    request(started[mode], "Hello", 4)  # warm up at this delay
                for _ in range(args.repeats):
                    for kind, text in DECODE_PROMPTS.items():
                        before = _draft_counters(started["ngram"])
                        for mode in modes:
                            pipeline = started[mode]
                            prefill = request(pipeline, text, 1)  # the prefill alone
                            seconds = request(pipeline, text, args.new) - prefill
                            figures.setdefault((rtt, mode, kind), []).append(
                                (args.new - 1) / seconds
                            )
                        after = _draft_counters(started["ngram"])
                        total = drafts.get((rtt, kind), (0.0, 0.0))
                        drafts[(rtt, kind)] = (
                            total[0] + after[0] - before[0],
                            total[1] + after[1] - before[1],
                        )
        finally:
            for pipeline in started.values():
                pipeline.stop()
            for front in fronts:
                front.stop()
    print(
        f"stages {args.stages} on loopback, each stage behind a delaying relay "
        f"(RTT/2 each way per hop), {args.new} greedy tokens per conversation, "
        f"{args.repeats} rounds; {os.getloadavg()[0]:.1f} load average"
    )
    print("RTT ms  prompt      off tok/s        ngram tok/s      speed-up (median, best)")
    for rtt in rtts:
        for kind in DECODE_PROMPTS:
            off, on = figures[(rtt, "off", kind)], figures[(rtt, "ngram", kind)]
            print(
                f"{rtt:6g}  {kind:10s}  {' '.join(f'{v:5.1f}' for v in off):15s}  "
                f"{' '.join(f'{v:5.1f}' for v in on):15s}  "
                f"{statistics.median(on) / statistics.median(off):.2f}x, "
                f"{max(on) / max(off):.2f}x"
            )
            drafted, kept = drafts[(rtt, kind)]
            rate = kept / drafted if drafted else 0.0
            rounds = " ".join(f"{b / a:.2f}" for a, b in zip(off, on, strict=True))
            print(f"        rounds {rounds}; drafted {drafted:g}, accepted {kept:g} ({rate:.0%})")


def _draft_counters(pipeline: pipelines.Pipeline) -> tuple[float, float]:
    return (
        counter(pipeline, "llmpipe_draft_tokens_total"),
        counter(pipeline, "llmpipe_accepted_draft_tokens_total"),
    )


def relay_rtt(args: argparse.Namespace) -> None:
    """The round trip the relay adds: `--rounds` ping-pongs of 64 bytes through one relay
    in front of an echo server, per configured RTT."""
    print(f"{args.rounds} round trips of 64 bytes per RTT; {os.getloadavg()[0]:.1f} load average")
    print("RTT ms  median ms  p90 ms  max ms  median - RTT")
    for rtt in (float(r) for r in args.rtt_ms.split(",")):
        median, p90, top = relay.summary(relay.ping_pong(rtt, rounds=args.rounds))
        print(f"{rtt:6g}  {median:9.2f}  {p90:6.2f}  {top:6.2f}  {median - rtt:+.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    first = commands.add_parser("ttft")
    first.add_argument("--stages", type=int, default=4)
    first.add_argument("--mbps", type=float, default=100)
    first.add_argument("--prompts", default="256,1024")
    first.add_argument("--chunk", type=int, default=128)
    first.add_argument("--repeats", type=int, default=2)
    first.add_argument(
        "--rtt-ms",
        type=float,
        default=0,
        help="> 0: stages on loopback behind delaying relays (no namespaces, no tbf)",
    )
    second = commands.add_parser("decode")
    second.add_argument("--stages", type=int, default=2)
    second.add_argument("--new", type=int, default=64)
    second.add_argument("--repeats", type=int, default=2)
    second.add_argument("--rtt-ms", default="0,30", help="comma-separated round-trip times")
    third = commands.add_parser("relay")
    third.add_argument("--rtt-ms", default="0,10,30")
    third.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    if args.command == "ttft":
        reason = None if args.rtt_ms else emulated.available()
        if reason:
            print(f"bench/latency.py: {reason}", file=sys.stderr)
            return 2
        ttft(args)
    elif args.command == "decode":
        decode(args)
    else:
        relay_rtt(args)
    subprocess.run(["uptime"], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
