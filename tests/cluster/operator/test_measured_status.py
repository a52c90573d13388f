"""`status.measured` from the stages' own /metrics, against a real API server.

A pipeline whose `/metrics` is protected by its API keys serves plan `abc12345` on two
stage pods (on Nodes kwok does not manage, so their status is ours to set: Running at
127.0.0.1). Each stage's /metrics is a real HTTP server on loopback serving the very
registry a stage process serves (`llmpipe_stage.metrics.StageMetrics`); stage 0's answers
401 without the first key of the pipeline's Secret, as a stage with `--protect-metrics`
does. A stage pod of an older plan has no server: reading it would fail the round.

Two rounds of `reconcile.measure.StageMetricsReader` must: find the serving plan's pods by
label, read the key from the Secret, scrape both stages, and on the second round patch
`status.measured` through the status subresource with the window's figures (the mean
step time the stages observed, the tokens stage 0 counted over the clock's window, the
estimate beside each stage), which the CRD's schema keeps and `kubectl get` shows in the
MEASURED TOK/S column. A third round, 10 s (the test's sustained window) later with the
stages still off their estimates by more than 50 %, records each node's time factor in
`status.effectiveFactors` and hands the pipeline to the re-planner's hook. No mocks: the
API server and the HTTP are real.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from lightkube import AsyncClient, KubeConfig
from lightkube.resources.core_v1 import ConfigMap, Node, Pod, Secret
from lightkube.types import PatchType

from llmpipe_operator.k8s import api
from llmpipe_operator.manifests import names
from llmpipe_operator.planning import speed
from llmpipe_operator.reconcile import measure
from llmpipe_stage.metrics import StageMetrics
from tests.cluster.operator.conftest import pipeline_manifest
from tests.support import control_plane as cp

DIGEST = "abc12345"
KEY = "sk-first"


class StageServers:
    """One loopback HTTP server per stage, each serving its StageMetrics registry."""

    def __init__(self, count: int) -> None:
        self.metrics = [StageMetrics(stage_index=i) for i in range(count)]
        self.ports: list[int] = []
        self.unauthorized = 0
        self._runners: list[web.AppRunner] = []

    async def start(self) -> None:
        for index, metrics in enumerate(self.metrics):
            app = web.Application()
            app.router.add_get("/metrics", self._handler(index, metrics))
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self._runners.append(runner)
            self.ports.append(runner.addresses[0][1])

    def _handler(self, index: int, metrics: StageMetrics) -> Any:
        async def handle(request: web.Request) -> web.Response:
            if index == 0 and request.headers.get("Authorization") != f"Bearer {KEY}":
                self.unauthorized += 1
                return web.Response(status=401)
            return web.Response(body=metrics.render(), content_type="text/plain")

        return handle

    async def stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()


@pytest.fixture
def nodes(control_plane: cp.ControlPlane) -> Iterator[list[str]]:
    tag = uuid.uuid4().hex[:6]
    created = [f"measured-{i}-{tag}" for i in range(2)]
    for name in created:
        control_plane.client().create(Node.from_dict({"metadata": {"name": name}}))
    yield created
    for name in created:
        control_plane.client().delete(Node, name)


def running_stage_pod(
    control_plane: cp.ControlPlane,
    namespace: str,
    *,
    pipeline: str,
    digest: str,
    index: int,
    node: str,
) -> None:
    labels = {
        names.LABEL_PIPELINE: pipeline,
        names.LABEL_PLAN_HASH: digest,
        names.LABEL_STAGE_INDEX: str(index),
        names.LABEL_COMPONENT: "stage",
    }
    client = control_plane.client()
    pod = client.create(
        Pod.from_dict(
            {
                "metadata": {"name": f"{pipeline}-{digest}-{index}", "labels": labels},
                "spec": {"nodeName": node, "containers": [{"name": "stage", "image": "stage"}]},
            }
        ),
        namespace=namespace,
    )
    client.patch(
        Pod.Status,
        pod.metadata.name,
        {"status": {"phase": "Running", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}]}},
        namespace=namespace,
        patch_type=PatchType.MERGE,
    )


def test_two_reads_of_the_stages_metrics_write_status_measured(
    control_plane: cp.ControlPlane, crd: Path, namespace: str, nodes: list[str], tmp_path: Path
) -> None:
    name = "measured"
    client = control_plane.client()
    secret = {"keys": base64.b64encode(f"# rotated monthly\n{KEY}\nsk-second\n".encode()).decode()}
    client.create(
        Secret.from_dict({"metadata": {"name": "keys-api"}, "data": secret}), namespace=namespace
    )
    manifest = pipeline_manifest(
        name,
        selector={"test.llmpipe.io/none": "x"},
        service={"auth": {"apiKeySecret": "keys-api", "protectMetrics": True}},
    )
    (tmp_path / "pipeline.json").write_text(json.dumps(manifest))
    control_plane.kubectl("apply", "-n", namespace, "-f", str(tmp_path / "pipeline.json"))
    plan = {
        "stages": [
            # made with a factor of 2 for nodes[0]: its estimate already includes it
            {"index": 0, "node": nodes[0], "computeSeconds": 0.01, "computeTimeFactor": 2.0},
            {"index": 1, "node": nodes[1], "computeSeconds": 0.02},
        ]
    }
    client.create(
        ConfigMap.from_dict(
            {
                "metadata": {
                    "name": f"{name}-{DIGEST}",
                    "labels": {names.LABEL_PIPELINE: name, names.LABEL_PLAN_HASH: DIGEST},
                },
                "data": {"plan.json": json.dumps(plan)},
            }
        ),
        namespace=namespace,
    )
    for index in range(2):
        running_stage_pod(
            control_plane, namespace, pipeline=name, digest=DIGEST, index=index, node=nodes[index]
        )
    running_stage_pod(
        control_plane, namespace, pipeline=name, digest="0ld0ld00", index=0, node=nodes[0]
    )

    servers = StageServers(2)
    ticks = iter([100.0, 110.0, 120.0])
    drifts: list[tuple[tuple[str, str], dict[str, float]]] = []

    def url_of(pod: Mapping[str, Any]) -> str | None:
        labels = pod["metadata"]["labels"]
        if labels[names.LABEL_PLAN_HASH] != DIGEST:
            return None  # an older plan's pod: no server (the reader must not ask it)
        assert measure.stage_url(pod) == f"http://127.0.0.1:{names.HTTP_PORT}/metrics"
        return f"http://127.0.0.1:{servers.ports[int(labels[names.LABEL_STAGE_INDEX])]}/metrics"

    def observe_a_window() -> None:
        for seconds in (0.01, 0.03):  # stage 0: two micro-batches, 20 ms mean
            servers.metrics[0].compute.observe(seconds)
            servers.metrics[0].send.observe(0.001)
        for seconds in (0.05, 0.05):  # stage 1: 50 ms, 2.5x its estimate
            servers.metrics[1].compute.observe(seconds)
        servers.metrics[0].count_tokens(30)

    async def rounds() -> tuple[list, list, dict, list, dict]:
        await servers.start()
        kube = AsyncClient(KubeConfig.from_file(control_plane.kubeconfig))
        try:
            await api.patch_status(
                kube, namespace=namespace, name=name, status={"servingPlanHash": DIGEST}
            )
            body = await api.get_pipeline(kube, namespace=namespace, name=name)
            assert body is not None
            reader = measure.StageMetricsReader(
                kube,
                lambda: [body],
                measure.MeasureSettings(
                    drift=speed.DriftSettings(threshold=0.5, window_seconds=10.0)
                ),
                url_of=url_of,
                clock=lambda: next(ticks),
                on_drift=lambda key, factors: drifts.append((key, dict(factors))),
            )
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
                first = await reader.round(session)
                observe_a_window()
                second = await reader.round(session)
                stored = await api.get_pipeline(kube, namespace=namespace, name=name)
                drifts_after_second = list(drifts)
                observe_a_window()  # off its estimate again, 10 s later: sustained
                assert await reader.round(session) == [(namespace, name)]
            recorded = await api.get_pipeline(kube, namespace=namespace, name=name)
            return first, second, stored or {}, drifts_after_second, recorded or {}
        finally:
            await kube.close()
            await servers.stop()

    first, second, stored, drifts_after_second, recorded = asyncio.run(rounds())
    assert first == [] and second == [(namespace, name)]
    assert servers.unauthorized == 0  # stage 0 was asked with the Secret's first key
    measured = stored["status"]["measured"]
    assert measured["planHash"] == DIGEST and measured["windowSeconds"] == 10.0
    assert measured["tokensPerSecond"] == 3.0  # 30 tokens in the 10 s window
    s0, s1 = measured["stages"]
    assert (s0["index"], s0["node"], s0["stepSeconds"], s0["sendSeconds"]) == (
        0,
        nodes[0],
        0.02,
        0.001,
    )
    assert (s0["estimatedSeconds"], s0["ratio"]) == (0.01, 2.0)
    assert (s1["stepSeconds"], s1["ratio"]) == (0.05, 2.5) and "sendSeconds" not in s1
    assert measured["bottleneckStage"] == 1 and measured["bottleneck"] == f"50.0ms s1@{nodes[1]}"
    shown = control_plane.kubectl("get", "llmpipelines", name, "-n", namespace).stdout
    header, row = shown.splitlines()[:2]
    assert "MEASURED TOK/S" in header
    column = header.index("MEASURED TOK/S")
    assert row[column:].split()[0] == "3"
    # No factor after one window; after the sustained one, each node's factor: the
    # factor its estimate included times the ratio (2 x 2.0 for nodes[0], 1 x 2.5).
    assert drifts_after_second == [] and "effectiveFactors" not in stored["status"]
    assert drifts == [((namespace, name), {nodes[0]: 4.0, nodes[1]: 2.5})]
    factors = recorded["status"]["effectiveFactors"]
    assert {n: f["computeTimeFactor"] for n, f in factors.items()} == {nodes[0]: 4.0, nodes[1]: 2.5}
    assert all(f["planHash"] == DIGEST and f["recordedAt"] for f in factors.values())
    assert recorded["status"]["measured"]["stages"][0]["ratio"] == 2.0
