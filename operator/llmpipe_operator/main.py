"""Kopf handlers: decorate, pick out the pipeline, call reconcile, return. Nothing else.

- create / update of spec / resume -> reconcile.pipeline.reconcile_pipeline (plan + deploy)
- a stage Deployment or the endpoint's EndpointSlice changes -> reconcile.switch.advance
- every pipeline, every 30 s -> reconcile.switch.advance, from the re-planner's task (a
  safety net for missed events; not a Kopf timer, since those always add a finalizer)
- every Node event and every LLMPipeline event -> reconcile.replan.Replanner (routes node
  changes to the pipelines they affect; its own task debounces and re-plans)
- the pipelines the re-planner knows -> reconcile.certs.Renewer (its own task renews stage
  certificates before they expire)
- with `--probe-namespace`: reconcile.probes.ProbeCollector (its own task writes the node
  probes' figures to the Nodes)
- reconcile.drain.DrainWatcher (its own task reads draining plans' stage 0 /metrics every
  2 s and advances their switch, so a drained plan goes once its stage 0 is empty)
- unless `--measure-interval 0`: reconcile.measure.StageMetricsReader (its own task reads
  the serving stages' /metrics into status.measured)

No finalizers: children are deleted by the garbage collector through owner references, so
deleting a pipeline never waits on the operator.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import kopf

from llmpipe_operator.k8s import api, metrics_api
from llmpipe_operator.manifests import names
from llmpipe_operator.reconcile import certs, drain, measure, pipeline, probes, switch
from llmpipe_operator.reconcile import replan as replanning

RESOURCE = (names.GROUP, names.VERSION, names.PLURAL)


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Handler progress lives in annotations under our own prefix, not in .status, which
    # belongs to the pipeline's user-facing status.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="llmpipe.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="llmpipe.io", key="last-handled-configuration"
    )
    settings.persistence.finalizer = "llmpipe.io/finalizer"  # never added: no delete handlers
    settings.posting.level = logging.WARNING  # our own Events say what happened
    settings.peering.standalone = True  # one replica (Recreate); no peering objects needed
    # Least privilege: no permission to list CRDs or namespaces, so do not scan for them
    # (Kopf would retry the forbidden requests for about a minute before falling back).
    # The CRD is installed before the operator starts; namespaces are given explicitly.
    settings.scanning.disabled = True
    # Watches that stay healthy for days: the server closes each watch after a while and
    # Kopf reconnects; a client timeout catches connections that silently died.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    settings.watching.reconnect_backoff = 1.0  # a flapping API server is not hammered
    settings.networking.request_timeout = 60
    memo.client = api.make_client()


@kopf.on.startup()
async def start_replanning(memo: kopf.Memo, **_: Any) -> None:
    """The node-metrics poller and the re-planner run as tasks owned by the operator."""
    memo.node_usage = metrics_api.NodeUsagePoller(memo.client)
    memo.replanner = replanning.Replanner(memo.client, usage=memo.node_usage)
    renewer = certs.Renewer(memo.client, pipelines=lambda: list(memo.replanner.pipelines))
    drains = drain.DrainWatcher(
        memo.client, lambda: [t.body for t in memo.replanner.pipelines.values()]
    )
    memo.replan_tasks = [
        asyncio.create_task(drains.run(), name="drain-watcher"),
        asyncio.create_task(memo.node_usage.run(), name="node-metrics"),
        asyncio.create_task(memo.replanner.run(), name="replanner"),
        asyncio.create_task(renewer.run(), name="certificate-renewer"),
    ]
    probe_settings = probes.configured()
    if probe_settings is not None:
        collector = probes.ProbeCollector(memo.client, probe_settings)
        memo.replan_tasks.append(asyncio.create_task(collector.run(), name="node-probes"))
    measuring = measure.configured()
    if measuring.interval_seconds > 0:
        reader = measure.StageMetricsReader(
            memo.client,
            lambda: [t.body for t in memo.replanner.pipelines.values()],
            measuring,
            on_drift=memo.replanner.measured_drift,
        )
        memo.replan_tasks.append(asyncio.create_task(reader.run(), name="stage-metrics"))
    for task in memo.replan_tasks:
        task.add_done_callback(_report_death)


def _report_death(task: asyncio.Task[None]) -> None:
    """A re-planning task that ends on its own is a bug: say why (the probe then fails)."""
    if not task.cancelled() and task.exception() is not None:
        logging.getLogger(__name__).error(
            "task %s died", task.get_name(), exc_info=task.exception()
        )


@kopf.on.cleanup()
async def stop_replanning(memo: kopf.Memo, **_: Any) -> None:
    for task in memo.replan_tasks:
        task.cancel()
    await asyncio.gather(*memo.replan_tasks, return_exceptions=True)


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    await memo.client.close()


@kopf.on.probe(id="replanner")
async def replanner_alive(memo: kopf.Memo, **_: Any) -> str:
    """Liveness: fails (and the kubelet restarts the operator) if a re-planning task died."""
    for task in memo.replan_tasks:
        if task.done():
            error = None if task.cancelled() else task.exception()
            raise RuntimeError(f"task {task.get_name()} stopped: {error!r}")
    return "running"


# Async on purpose: Kopf runs sync handlers in threads, and the re-planner is not thread-safe.
@kopf.on.event("", "v1", "nodes")
async def node_changed(event: Mapping[str, Any], memo: kopf.Memo, **_: Any) -> None:
    memo.replanner.node_event(event.get("type"), event["object"])


@kopf.on.event(*RESOURCE)
async def pipeline_seen(event: Mapping[str, Any], memo: kopf.Memo, **_: Any) -> None:
    memo.replanner.pipeline_event(event.get("type"), event["object"])


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE, field="spec")
async def reconcile_spec(name: str, namespace: str | None, memo: Any, **_: Any) -> None:
    usage = memo.replanner.memory_usage_for(_ns(namespace), name)
    await pipeline.reconcile_pipeline(
        memo.client, namespace=_ns(namespace), name=name, memory_usage=usage
    )


@kopf.on.event(
    "apps",
    "v1",
    "deployments",
    labels={names.LABEL_PIPELINE: kopf.PRESENT, names.LABEL_COMPONENT: "stage"},
)
async def stage_changed(
    namespace: str | None, labels: Mapping[str, str], memo: Any, **_: Any
) -> None:
    await switch.advance(memo.client, namespace=_ns(namespace), name=labels[names.LABEL_PIPELINE])


@kopf.on.event(
    "discovery.k8s.io",
    "v1",
    "endpointslices",
    labels={names.LABEL_PIPELINE: kopf.PRESENT, names.LABEL_COMPONENT: "endpoint"},
)
async def endpoints_changed(
    namespace: str | None, labels: Mapping[str, str], memo: Any, **_: Any
) -> None:
    await switch.advance(memo.client, namespace=_ns(namespace), name=labels[names.LABEL_PIPELINE])


def _ns(namespace: str | None) -> str:
    """Every resource handled here is namespaced; Kopf types the argument as optional."""
    if namespace is None:
        raise kopf.PermanentError("a namespaced object arrived without a namespace")
    return namespace
