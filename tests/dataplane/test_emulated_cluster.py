"""Plans from measured facts on a small emulated cluster, with real probes and real stages.

Two "nodes" (tests/support/emulated.py: network namespaces, each with a cgroup CPU budget,
joined by a `tc tbf`-shaped veth pair) run the node probe (`llmpipe_stage.probe`); the
operator's own code reads them (`reconcile.probes`: facts, then the link), writes the
annotations (`planning.measured.node_annotations`) onto Node objects, and plans from
them (`planning.live` -> `planning.planner`). Covers: the measured link stays under its
configured rate and the node with five times the CPU measures faster (orderings and caps
only: no timed assertion); the plan built from the measurements gives the faster node
more layers; that plan runs as stage processes inside the two nodes and its greedy tokens
equal single-process `generate`. Needs root with `ip`, `tc` and cgroup v1 cpu; skipped
otherwise.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from llmpipe_cli import modelfiles
from llmpipe_operator.planning import cost, live, measured, planner
from llmpipe_operator.reconcile import probes
from tests.dataplane import pipelines
from tests.support import emulated

LINK_MBPS = 8
PROBE_PORT = emulated.PROBE_PORT
DESCRIPTION = {
    "nodes": [
        {"name": "big", "cpus": 0.5, "memory": "2Gi", "tier": "edge"},
        {"name": "small", "cpus": 0.1, "memory": "2Gi", "tier": "edge"},
    ],
    "defaultMbps": LINK_MBPS,
}


@pytest.fixture(scope="module")
def cluster() -> Iterator[emulated.Cluster]:
    reason = emulated.available()
    if reason:
        pytest.skip(f"cannot emulate a cluster here: {reason}")
    built = emulated.Cluster.start(DESCRIPTION)
    yield built
    built.stop()


@pytest.fixture(scope="module")
def probed(cluster: emulated.Cluster) -> Iterator[tuple[dict[str, Any], dict[Any, Any]]]:
    """(facts by node, links by pair) as the operator's probe round reads them."""
    running = []
    try:
        for node in cluster.nodes:  # one after another: the nodes share this machine's CPUs
            command = emulated.probe_command(node.prefix(), host=node.address, seconds=1)
            running.append(
                subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
            asyncio.run(read(cluster, only=node.name))
        yield asyncio.run(read(cluster, only=None, pairs=True))
    finally:
        for process in running:
            process.terminate()
            process.wait()


async def read(
    cluster: emulated.Cluster, *, only: str | None, pairs: bool = False
) -> tuple[dict[str, Any], dict[Any, Any]]:
    found = {
        n.name: probes.Probe(node=n.name, address=n.address)
        for n in cluster.nodes
        if only in (None, n.name)
    }
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        facts: dict[str, Any] = {}
        deadline = time.monotonic() + 240
        while len(facts) < len(found):
            if time.monotonic() > deadline:
                raise RuntimeError(f"probes did not report: {sorted(set(found) - set(facts))}")
            facts = await probes.collect_facts(session, found, port=PROBE_PORT)
            await asyncio.sleep(0.5)
        due = probes.due_pairs(sorted(facts), last_measured={}, now=0, every_seconds=1)
        links = (
            await probes.measure_pairs(session, found, facts, due, port=PROBE_PORT) if pairs else {}
        )
    return facts, links


def nodes_from(cluster: emulated.Cluster, facts, links) -> list[dict[str, Any]]:
    out = []
    for node in cluster.nodes:
        obj = {
            "metadata": {"name": node.name, "labels": {live.LABEL_TIER: "edge"}, "annotations": {}},
            "spec": {},
            "status": {
                "allocatable": {"memory": node.facts["memory"]},
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }
        written = measured.node_annotations(
            obj, facts=facts[node.name], links=probes.links_of(node.name, links), margin=0.1
        )
        assert written is not None
        obj["metadata"]["annotations"].update(written)
        out.append(obj)
    return out


def test_probe_figures_follow_the_configured_budgets(cluster, probed) -> None:
    facts, links = probed
    assert facts["big"]["tflops"] > facts["small"]["tflops"]  # five times the CPU
    ((pair, link),) = links.items()
    assert set(pair) == {"big", "small"}
    assert 0 < link["mbps"] <= LINK_MBPS * 1.1  # tbf caps it; payload < wire bytes
    assert link["rttMs"] > 0


def test_the_plan_from_measurements_runs_exactly_in_the_nodes(
    cluster, probed, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    facts, links = probed
    inventory = live.build_inventory(
        nodes_from(cluster, facts, links), eligibility=live.Eligibility()
    ).inventory
    assert inventory.node("big").tflops == pytest.approx(facts["big"]["tflops"])
    assert inventory.mbps("big", "small") == pytest.approx(next(iter(links.values()))["mbps"])
    model_dir = model_dirs["llama-gqa"]
    profile = modelfiles.load_profile(model_dir)
    workload = cost.Workload(max_sequences=4, max_context_tokens=128, runtime_overhead_bytes=0)
    plan = planner.plan_pipeline(
        profile, inventory, workload=workload, placement=planner.Placement(max_stages=2)
    ).to_dict()
    layers = {s["node"]: s["layerEnd"] - s["layerStart"] for s in plan["stages"]}
    assert layers.get("big", 0) > layers.get("small", 0)
    nodes = [cluster.node(s["node"]) for s in plan["stages"]]
    pipeline = pipelines.Pipeline.start(
        model_dir,
        tmp_path,
        stages=len(nodes),
        max_sequences=4,
        max_context=128,
        hosts=[n.address for n in nodes],
        prefixes=[n.prefix() for n in nodes],
        plan=plan,
        ready_timeout=300,
    )
    try:
        prompt = [5, 6, 7, 8, 9]
        status, body = pipelines.http_json(
            f"{pipeline.base_url}/v1/completions",
            {
                "model": "tiny",
                "prompt": prompt,
                "max_tokens": 8,
                "temperature": 0,
                "return_token_ids": True,
            },
            timeout=300,
        )
        assert status == 200, body
        assert (
            body["choices"][0]["token_ids"]
            == pipelines.reference_tokens(model_dir, [prompt], [8])[0]
        )
        # every stage timed its compute and (with a next stage) its hop
        series_timed = ["llmpipe_stage_compute_seconds"]
        if pipeline.num_stages > 1:
            series_timed.append("llmpipe_stage_send_seconds")
        for index in range(pipeline.num_stages):
            url = f"http://{pipeline.host(index)}:{pipeline.http_ports[index]}/metrics"
            text = urllib.request.urlopen(url, timeout=10).read().decode()
            for series in series_timed:
                count = re.search(rf'^{series}_count{{stage="{index}"}} (\S+)$', text, re.M)
                assert count is not None and float(count[1]) > 0, (series, index)
    finally:
        pipeline.stop()
