"""The node probes' results onto the Nodes: the operator side of measured node facts.

The probes (the chart's opt-in DaemonSet, `llmpipe_stage.probe`) have no API rights. Every
`poll_seconds` this task:

1. lists the probe pods (the release's namespace, the probe's labels) and the Nodes;
2. reads each running probe's `GET /facts` (a probe that does not answer keeps its node's
   written figures);
3. measures the links that are due, one pair at a time (`planning.measured.pair_rounds`
   orders them): every pair with a node that has no measured link yet (a node joined, or
   its probe restarted) and every pair whose last measurement is older than
   `links_seconds`; each costs at most the probe's few MB;
4. writes `llmpipe.io/measured` and the measured links into `llmpipe.io/links`, but only
   where a figure moved beyond the margin (`planning.measured.node_annotations`).

A written annotation is a Node change under `llmpipe.io/`, so the re-planner sees it like
any label edit: debounced, then the hysteresis of `planning.replan.decide_switch`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
from lightkube import AsyncClient

from llmpipe_operator.k8s import api, errors
from llmpipe_operator.planning import measured

log = logging.getLogger(__name__)

Pair = tuple[str, str]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProbeSettings:
    """Where the probes are and how often they are read (the chart's `probe` values)."""

    namespace: str
    labels: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: {"app.kubernetes.io/component": "node-probe"}
    )
    port: int = 8090
    """The probes' HTTP port (the chart's default)."""
    poll_seconds: float = 60.0
    """Reading every probe's facts costs one small GET each; a minute notices a joined node."""
    links_seconds: float = 3600.0
    """Links are re-measured hourly: each pair costs a few MB, so not more often."""
    margin: float = 0.1
    """A figure is rewritten when it moved by more than 10 %: below the default re-plan
    margin (20 %), so a change that could matter reaches the planner, and above the spread
    of repeated probe runs on a quiet node (docs/benchmarks.md)."""
    timeout_seconds: float = 60.0
    """One link measurement at 1 Mbit/s takes ~3 s; the bound covers a congested link."""


@dataclasses.dataclass
class Probe:
    node: str
    address: str
    """Pod IP."""


def running_probes(pods: list[dict[str, Any]]) -> dict[str, Probe]:
    """node -> its probe, for the probe pods that run and have an IP."""
    found = {}
    for pod in pods:
        spec, status = pod.get("spec") or {}, pod.get("status") or {}
        node, ip = spec.get("nodeName"), status.get("podIP")
        if node and ip and status.get("phase") == "Running":
            found[str(node)] = Probe(node=str(node), address=str(ip))
    return found


def due_pairs(
    nodes: list[str],
    *,
    last_measured: Mapping[Pair, float],
    now: float,
    every_seconds: float,
) -> list[Pair]:
    """The pairs to measure this round, in disjoint-pair rounds: never measured, or stale."""
    return [
        pair
        for round_pairs in measured.pair_rounds(nodes)
        for pair in round_pairs
        if pair not in last_measured or now - last_measured[pair] >= every_seconds
    ]


_configured: ProbeSettings | None = None


def configure(settings: ProbeSettings | None) -> None:
    """Set once at start-up from the command line (`--probe-namespace`); None: no probes."""
    global _configured
    _configured = settings


def configured() -> ProbeSettings | None:
    return _configured


class ProbeCollector:
    """Run `run()` as a task owned by the operator (started at startup when the probe is
    enabled, cancelled at cleanup)."""

    def __init__(self, client: AsyncClient, settings: ProbeSettings) -> None:
        self.client, self.settings = client, settings
        self.last_measured: dict[Pair, float] = {}

    async def run(self) -> None:
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.settings.timeout_seconds)
        ) as session:
            while True:
                try:
                    await self.round(session)
                except errors.API_ERRORS as error:
                    # transient: the next round retries; forbidden: the chart's RBAC for the
                    # probe is missing, which a restart would not fix either
                    if not (errors.is_transient(error) or errors.is_forbidden(error)):
                        raise
                    log.warning(
                        "node probes: %s; next round in %.0f s",
                        errors.describe(error),
                        self.settings.poll_seconds,
                    )
                await asyncio.sleep(self.settings.poll_seconds)

    async def round(self, session: aiohttp.ClientSession) -> dict[str, dict[str, str]]:
        """One pass of steps 1-4; returns the annotations written, by node."""
        # 1. observe the probes and nodes
        pods = await api.list_labelled_pods(
            self.client, namespace=self.settings.namespace, labels=self.settings.labels
        )
        probes = running_probes(pods)
        nodes = {n["metadata"]["name"]: n for n in await api.list_nodes(self.client)}
        probes = {name: p for name, p in probes.items() if name in nodes}
        # 2. read facts
        facts = await collect_facts(session, probes, port=self.settings.port)
        # 3. measure the links that are due
        pairs = due_pairs(
            sorted(n for n in probes if n in facts),
            last_measured=self.last_measured,
            now=time.monotonic(),
            every_seconds=self.settings.links_seconds,
        )
        links = await measure_pairs(session, probes, facts, pairs, port=self.settings.port)
        for pair in links:
            self.last_measured[pair] = time.monotonic()
        # 4. write what moved
        written = {}
        for name in sorted(set(facts) | {n for pair in links for n in pair}):
            annotations = measured.node_annotations(
                nodes[name],
                facts=facts.get(name),
                links=links_of(name, links),
                margin=self.settings.margin,
            )
            if annotations:
                await api.patch_node_annotations(self.client, name=name, annotations=annotations)
                written[name] = annotations
                log.info("node %s: measured facts written (%s)", name, ", ".join(annotations))
        return written


def links_of(node: str, links: Mapping[Pair, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """The measured links touching `node`, by peer (a link is symmetric)."""
    out = {}
    for (a, b), value in links.items():
        if node in (a, b):
            out[b if node == a else a] = {"mbps": value["mbps"], "rttMs": value["rttMs"]}
    return out


async def collect_facts(
    session: aiohttp.ClientSession, probes: Mapping[str, Probe], *, port: int
) -> dict[str, dict[str, Any]]:
    """node -> facts, for every probe that answered (the others are left out, logged)."""
    found = {}
    for name, probe in sorted(probes.items()):
        try:
            async with session.get(f"http://{_host(probe.address)}:{port}/facts") as response:
                if response.status == 200:
                    found[name] = dict(await response.json())
        except (aiohttp.ClientError, TimeoutError) as error:
            log.info("node probe on %s did not answer: %s", name, error)
    return found


async def measure_pairs(
    session: aiohttp.ClientSession,
    probes: Mapping[str, Probe],
    facts: Mapping[str, Mapping[str, Any]],
    pairs: list[Pair],
    *,
    port: int,
) -> dict[Pair, dict[str, float]]:
    """One pair at a time: a's probe sends to b's link port (no two transfers overlap)."""
    found = {}
    for a, b in pairs:
        peer = f"{_host(probes[b].address)}:{int(facts[b].get('linkPort', 8091))}"
        url = f"http://{_host(probes[a].address)}:{port}/links"
        try:
            async with session.post(url, json={"peer": peer}) as response:
                body = await response.json()
                if response.status == 200:
                    found[(a, b)] = {"mbps": float(body["mbps"]), "rttMs": float(body["rttMs"])}
                else:
                    log.info("link %s -> %s not measured: %s", a, b, body.get("error"))
        except (aiohttp.ClientError, TimeoutError) as error:
            log.info("link %s -> %s not measured: %s", a, b, error)
    return found


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address
