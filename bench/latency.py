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
import json
import os
import re
import signal
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


class Fronts:
    """Delaying relays in front of the stages (tests/support/relay.py), made as
    `pipelines.Pipeline.start` asks for each stage's peer address. On loopback
    (`cluster` None) they run in this process; in an emulated cluster each runs as a process
    in its stage's namespace (outside the stage's CPU budget), so a hop crosses the sender's
    `tc tbf`-shaped veth, then the delay: rate limit and round-trip time per hop."""

    def __init__(self, cluster: emulated.Cluster | None, *, rtt_ms: float = 0.0) -> None:
        self.cluster = cluster
        self.rtt_ms = rtt_ms
        self.started: list[Any] = []

    def via(self, address: str) -> str:
        host, port = address.rsplit(":", 1)
        one_way = self.rtt_ms / 2
        if self.cluster is None:
            front: Any = relay.Relay((host, int(port)), one_way_ms=one_way).start()
        else:
            node = next(n for n in self.cluster.nodes if n.address == host)
            front = relay.RelayProcess(
                (host, int(port)),
                host=host,
                one_way_ms=one_way,
                prefix=self.cluster.network_prefix(node),
            )
        self.started.append(front)
        return str(front.address)

    def set_rtt(self, rtt_ms: float) -> None:
        self.rtt_ms = rtt_ms
        for front in self.started:
            front.delay = rtt_ms / 2000

    def stop(self) -> None:
        for front in self.started:
            front.stop()
        self.started.clear()


def cluster_of(stages: int, mbps: float) -> emulated.Cluster:
    """One namespace per stage, each an equal share of the cores, `mbps` per hop."""
    cores = os.cpu_count() or 1
    return emulated.Cluster.start(
        {
            "nodes": [
                {"name": f"s{i}", "cpus": cores / stages, "memory": "4Gi", "tier": "edge"}
                for i in range(stages)
            ],
            "defaultMbps": mbps,
        }
    )


def start(
    directory: Path,
    run_dir: Path,
    *,
    stages: int,
    workload: dict[str, Any],
    cluster: emulated.Cluster | None,
    max_context: int,
    peer_address: Any = None,
    extra_args: tuple[str, ...] = (),
) -> pipelines.Pipeline:
    options: dict[str, Any] = {"peer_address": peer_address}
    if cluster is not None:
        options["hosts"] = [node.address for node in cluster.nodes]
        options["prefixes"] = [node.prefix() for node in cluster.nodes]
    return pipelines.Pipeline.start(
        directory,
        run_dir,
        stages=stages,
        name=NAME,
        max_context=max_context,
        plaintext=True,
        workload=workload,
        ready_timeout=600,
        # a whole 4,096-token prompt on 0.5 core takes past the default 30 s step timeout
        extra_args=("--step-timeout", "900", *extra_args),
        **options,
    )


def ideal_chunked(
    whole: float, *, stages: int, tokens: int, chunk: int, mbps: float, rtt_ms: float, width: int
) -> float:
    """The chunked schedule of docs/planning.md ("Chunked prefill") fed with the measured
    whole-prompt time: one stage's compute C = (whole - (S - 1) transfer(P) - S hop) / S, a
    chunk's step C / n + 2 ms, its link transfer(c); the ordered sender sends a prompt's
    next chunk on a link once the previous one's call came back, so a link carries one
    chunk per transfer(c) + RTT. `width`: bytes per token on the wire."""
    hop = rtt_ms / 2000

    def transfer(n: int) -> float:
        return n * width * 8 / (mbps * 1e6) if mbps else 0.0

    n = -(-tokens // chunk)
    compute = (whole - (stages - 1) * transfer(tokens) - stages * hop) / stages
    step = compute / n + 0.002
    link = transfer(chunk)
    beat = max(step, link + 2 * hop)
    return stages * step + (stages - 1) * link + stages * hop + (n - 1) * beat


def ttft(args: argparse.Namespace) -> None:
    directory = model_dir()
    cores = os.cpu_count() or 1
    width = 4 * int(json.loads((directory / "config.json").read_text())["hidden_size"])
    lengths = [int(p) for p in args.prompts.split(",")]
    prompts = {n: prompt_ids(directory, n) for n in lengths}
    results: dict[tuple[int, int], list[float]] = {}
    for chunk in (0, args.chunk):  # one pipeline at a time: both would share the cores
        cluster = cluster_of(args.stages, args.mbps)
        fronts = Fronts(cluster, rtt_ms=args.rtt_ms)
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
                    peer_address=fronts.via if args.rtt_ms else None,
                )
                request(pipeline, prompts[lengths[0]][:32], 1)  # warm up
                for _ in range(args.repeats):
                    for n in lengths:
                        results.setdefault((chunk, n), []).append(request(pipeline, prompts[n], 1))
        finally:
            if pipeline is not None:
                pipeline.stop()
            fronts.stop()
            cluster.stop()
    relays = f", {args.rtt_ms:g} ms RTT per hop (delaying relays in the namespaces)"
    print(
        f"stages {args.stages}, {args.mbps:g} Mbit/s per hop{relays if args.rtt_ms else ''}, "
        f"each stage {cores / args.stages:g} cores, chunk {args.chunk}; "
        f"{os.getloadavg()[0]:.1f} load average"
    )
    print("prompt  TTFT whole (s)        TTFT chunked (s)      speed-up  ideal (s)  ideal x")
    for n in lengths:
        whole, cut = results[(0, n)], results[(args.chunk, n)]
        best = ideal_chunked(
            min(whole),
            stages=args.stages,
            tokens=n,
            chunk=args.chunk,
            mbps=args.mbps,
            rtt_ms=args.rtt_ms,
            width=width,
        )
        print(
            f"{n:6d}  {' '.join(f'{t:6.2f}' for t in whole):20s}  "
            f"{' '.join(f'{t:6.2f}' for t in cut):20s}  {min(whole) / min(cut):6.2f}x  "
            f"{best:9.2f}  {min(whole) / best:6.2f}x"
        )


def decode(args: argparse.Namespace) -> None:
    """The pipelines (one per mode) are up at once, each stage behind a delaying relay;
    one request at a time, the modes alternating within each round, so a change of load
    hits them alike. The relays' delay is set per RTT between rounds. With `--mbps` the
    stages run in an emulated cluster (a namespace and an equal share of the cores per
    stage, `tc tbf` per hop) and the relays in the namespaces; without, on loopback."""
    directory = model_dir()
    rtts = [float(r) for r in args.rtt_ms.split(",")]
    modes = args.modes.split(",")
    kinds = args.prompts.split(",")
    figures: dict[tuple[float, str, str], list[float]] = {}
    drafts: dict[tuple[float, str, str], tuple[float, float]] = {}  # (rtt, mode, prompt)
    cluster = cluster_of(args.stages, args.mbps) if args.mbps else None
    fronts = Fronts(cluster)
    started: dict[str, pipelines.Pipeline] = {}
    with tempfile.TemporaryDirectory() as run:
        try:
            draft_args = draft_model_args(args, directory, Path(run))
            for mode in modes:
                started[mode] = start(
                    directory,
                    Path(run) / mode,
                    stages=args.stages,
                    workload={"speculation": mode},
                    cluster=cluster,
                    max_context=1024,
                    peer_address=fronts.via,
                    extra_args=draft_args if mode == "draft" else (),
                )
            for rtt in rtts:
                fronts.set_rtt(rtt)
                for mode in modes:
                    request(started[mode], "Hello", 4)  # warm up at this delay
                for _ in range(args.repeats):
                    for kind in kinds:
                        text = DECODE_PROMPTS[kind]
                        for mode in modes:
                            pipeline = started[mode]
                            before = _draft_counters(pipeline)
                            prefill = request(pipeline, text, 1)  # the prefill alone
                            seconds = request(pipeline, text, args.new) - prefill
                            figures.setdefault((rtt, mode, kind), []).append(
                                (args.new - 1) / seconds
                            )
                            after = _draft_counters(pipeline)
                            total = drafts.get((rtt, mode, kind), (0.0, 0.0))
                            drafts[(rtt, mode, kind)] = (
                                total[0] + after[0] - before[0],
                                total[1] + after[1] - before[1],
                            )
                _print_decode(args, rtt, figures, drafts)
        finally:
            for pipeline in started.values():
                pipeline.stop()
            fronts.stop()
            if cluster is not None:
                cluster.stop()


def _print_decode(
    args: argparse.Namespace,
    rtt: float,
    figures: dict[tuple[float, str, str], list[float]],
    drafts: dict[tuple[float, str, str], tuple[float, float]],
) -> None:
    """One RTT's figures (printed as soon as its rounds are done)."""
    modes, kinds = args.modes.split(","), args.prompts.split(",")
    where = (
        f"in namespaces, {args.mbps:g} Mbit/s per hop, each stage "
        f"{(os.cpu_count() or 1) / args.stages:g} cores"
        if args.mbps
        else "on loopback"
    )
    print(
        f"stages {args.stages} {where}, each stage behind a delaying relay (RTT/2 each way "
        f"per hop), {args.new} greedy tokens per conversation, {args.repeats} rounds; "
        f"{os.getloadavg()[0]:.1f} load average"
    )
    for kind in kinds:
        off = figures[(rtt, "off", kind)] if "off" in modes else None
        for mode in modes:
            values = figures[(rtt, mode, kind)]
            line = f"{rtt:6g} ms  {kind:10s} {mode:6s} {' '.join(f'{v:5.1f}' for v in values)}"
            if off is not None and mode != "off":
                rounds = " ".join(f"{b / a:.2f}" for a, b in zip(off, values, strict=True))
                ratios = sorted(b / a for a, b in zip(off, values, strict=True))
                drafted, kept = drafts[(rtt, mode, kind)]
                rate = kept / drafted if drafted else 0.0
                line += (
                    f"  x{statistics.median(values) / statistics.median(off):.2f} median, "
                    f"x{max(values) / max(off):.2f} best; per round {rounds} "
                    f"(median {statistics.median(ratios):.2f}, worst {ratios[0]:.2f}); "
                    f"drafted {drafted:g}, accepted {kept:g} ({rate:.0%})"
                )
            print(line, flush=True)


def draft_model_args(args: argparse.Namespace, directory: Path, run: Path) -> tuple[str, ...]:
    """`--draft-model-dir` for the draft pipeline: `--draft-model`, or with `--draft-layers
    N` the served model's first N layers (a test of the mechanism, not a fast draft)."""
    if "draft" not in args.modes.split(","):
        return ()
    if args.draft_model:
        return ("--draft-model-dir", args.draft_model)
    from tests.dataplane.test_draft_model import truncated_copy

    return ("--draft-model-dir", str(truncated_copy(directory, run / "draft", args.draft_layers)))


def _draft_counters(pipeline: pipelines.Pipeline) -> tuple[float, float]:
    return (
        counter(pipeline, "llmpipe_draft_tokens_total"),
        counter(pipeline, "llmpipe_accepted_draft_tokens_total"),
    )


def relay_rtt(args: argparse.Namespace) -> None:
    """The round trip the relay adds: `--rounds` ping-pongs of `--size` bytes through one
    relay in front of an echo server, per configured RTT. With `--mbps`: across a
    2-node emulated cluster, the client in node 0, the relay and the echo server in node 1
    (the relay in the namespace, as `decode --mbps` and `ttft --rtt-ms` put it), so the
    round trip crosses both shaped veth ends; the first line is the veths alone."""
    cluster = cluster_of(2, args.mbps) if args.mbps else None
    sizes = [int(s) for s in args.size.split(",")]
    where = f"across namespaces at {args.mbps:g} Mbit/s" if cluster else "on loopback"
    print(f"{args.rounds} round trips per RTT {where}; {os.getloadavg()[0]:.1f} load average")
    print("bytes   RTT ms  median ms  p90 ms  max ms  median - RTT")
    try:
        for size in sizes:
            if cluster is not None:
                near, far = cluster.nodes
                with relay.echo_process(far.address, prefix=cluster.network_prefix(far)) as echo:
                    seconds = relay.ping_from(
                        echo, rounds=args.rounds, size=size, prefix=cluster.network_prefix(near)
                    )
                    _print_rtt(size, None, seconds)
                    for rtt in (float(r) for r in args.rtt_ms.split(",")):
                        front = relay.RelayProcess(
                            echo,
                            host=far.address,
                            one_way_ms=rtt / 2,
                            prefix=cluster.network_prefix(far),
                        )
                        try:
                            seconds = relay.ping_from(
                                (far.address, front.port),
                                rounds=args.rounds,
                                size=size,
                                prefix=cluster.network_prefix(near),
                            )
                        finally:
                            front.stop()
                        _print_rtt(size, rtt, seconds)
            else:
                for rtt in (float(r) for r in args.rtt_ms.split(",")):
                    _print_rtt(size, rtt, relay.ping_pong(rtt, rounds=args.rounds, size=size))
    finally:
        if cluster is not None:
            cluster.stop()


def _print_rtt(size: int, rtt: float | None, seconds: list[float]) -> None:
    median, p90, top = relay.summary(seconds)
    label = "veth" if rtt is None else f"{rtt:g}"
    extra = "" if rtt is None else f"{median - rtt:+.2f}"
    print(f"{size:7d}  {label:>6s}  {median:9.2f}  {p90:6.2f}  {top:6.2f}  {extra}")


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
        help="> 0: a delaying relay in front of each stage, in its namespace",
    )
    second = commands.add_parser("decode")
    second.add_argument("--stages", type=int, default=2)
    second.add_argument("--new", type=int, default=64)
    second.add_argument("--repeats", type=int, default=2)
    second.add_argument("--rtt-ms", default="0,30", help="comma-separated round-trip times")
    second.add_argument(
        "--mbps", type=float, default=0, help="> 0: in namespaces, tc tbf per hop at this rate"
    )
    second.add_argument("--modes", default="off,ngram", help="of off, ngram, draft")
    second.add_argument("--prompts", default=",".join(DECODE_PROMPTS))
    second.add_argument("--draft-model", default="", help="the draft model's directory")
    second.add_argument(
        "--draft-layers", type=int, default=24, help="else the served model's first N layers"
    )
    third = commands.add_parser("relay")
    third.add_argument("--rtt-ms", default="0,10,30")
    third.add_argument("--rounds", type=int, default=200)
    third.add_argument("--size", default="64", help="comma-separated message sizes (bytes)")
    third.add_argument("--mbps", type=float, default=0, help="> 0: across namespaces")
    args = parser.parse_args()
    # `timeout` ends a run with SIGTERM: exit through the finally blocks, which stop the
    # stages and remove the namespaces and cgroups
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    needs_root = args.command == "ttft" or getattr(args, "mbps", 0)
    if needs_root:
        reason = emulated.available()
        if reason:
            print(f"bench/latency.py: {reason}", file=sys.stderr)
            return 2
    if args.command == "ttft":
        ttft(args)
    elif args.command == "decode":
        decode(args)
    else:
        relay_rtt(args)
    subprocess.run(["uptime"], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
