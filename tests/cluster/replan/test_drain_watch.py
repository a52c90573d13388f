"""A drain that ends when the old plan's stage 0 is empty, on the real control plane.

The operator runs as a process (the lab), re-plans when the stage-0 node is cordoned,
switches the Service and starts draining the old plan, with `drainSeconds` 300 so that
only an early end can remove it within the test. kwok's pods have no process behind
them, so the operator's own drain task cannot read the old stage 0 (its pod IP answers
nothing): unknown, and the plan keeps draining past the 5 s floor, which the test checks.

Then the same task's code (`reconcile.drain.DrainWatcher.round`) runs here against the
same API server, with the old stage 0's address pointed at a real HTTP server on
loopback serving a stage 0's own registry (`StageMetrics` and the OpenAI routes' requests
gauge): with 2 requests in progress the plan stays; with none, its Deployments, Services
and ConfigMap go, its pods follow, and the Drained Event says its stage 0 was empty. Both
this watcher and the operator advance the switch meanwhile, as two triggers of one
level-triggered step do. No mocks: the API server, the HTTP and the decision are real.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
from aiohttp import web
from lightkube import AsyncClient, KubeConfig

from llmpipe_operator.manifests import names
from llmpipe_operator.reconcile import drain
from tests.support import wait
from tests.support.stage_metrics import stage_0_metrics

from .test_replan import SMALL, new_plan_serving


async def serve_registry(metrics: Any) -> tuple[web.AppRunner, int]:
    async def handle(request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


def test_a_drain_ends_once_the_old_stage_0_reports_nothing_in_progress(lab, operator) -> None:
    for i in range(3):
        lab.add_node(f"e{i}", **{**SMALL, "memory": "96Mi"})
    lab.apply_pipeline("chat", replan={"debounceSeconds": 30, "drainSeconds": 300})
    first = lab.wait_ready("chat")
    old = first["planHash"]
    lab.plane.cordon(lab.planned_nodes(first)[0])
    lab.wait_status("chat", new_plan_serving(old), what="the switch")
    lab.wait_status(
        "chat", lambda s: old in (s.get("drainingPlans") or {}), what="the drain", timeout=30
    )
    began = time.monotonic()
    # The operator's own task reads every 2 s but gets no answer from a kwok pod: unknown.
    time.sleep(8)
    assert lab.stage_pods("chat", old), "an unread stage 0 ended the drain"
    assert old in (lab.status("chat").get("drainingPlans") or {})

    metrics, routes = stage_0_metrics()

    def url_of(port: int):
        def url(pod: Mapping[str, Any]) -> str | None:
            labels = pod["metadata"]["labels"]
            if labels[names.LABEL_PLAN_HASH] == old and labels[names.LABEL_STAGE_INDEX] == "0":
                return f"http://127.0.0.1:{port}/metrics"
            return None  # any other pod: not asked

        return url

    async def rounds() -> list[dict[tuple[str, str], dict[str, int]]]:
        runner, port = await serve_registry(metrics)
        kube = AsyncClient(KubeConfig.from_file(lab.plane.kubeconfig))
        watcher = drain.DrainWatcher(kube, lambda: [lab.pipeline("chat")], url_of=url_of(port))
        seen = []
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
                routes.in_progress.inc(2)  # two requests still being answered
                seen.append(await watcher.round(session))
                assert lab.plan_objects("chat", old), "removed while busy"
                routes.in_progress.dec(2)
                seen.append(await watcher.round(session))
        finally:
            await kube.close()
            await runner.cleanup()
        return seen

    busy, empty = asyncio.run(rounds())
    key = (lab.namespace, "chat")
    assert busy == {key: {old: 2}} and empty == {key: {old: 0}}
    assert lab.plan_objects("chat", old) == []
    wait.until(
        lambda: not lab.stage_pods("chat", old), what="the old plan's pods to go", timeout=60
    )
    # The operator, advancing meanwhile, may see the plan half removed (a stage gone) and
    # say Drained once more for that reason; the early end is the one this watcher made.
    early = f"plan {old} drained (its stage 0 has no request in progress); removing it"
    wait.until(
        lambda: early in [e.message for e in lab.events("chat") if e.reason == "Drained"],
        what="the Drained Event of the early end",
        timeout=30,
    )
    assert "drainingPlans" not in lab.status("chat") or not lab.status("chat")["drainingPlans"]
    assert time.monotonic() - began < 120, "the 300 s bound cannot have ended it"
