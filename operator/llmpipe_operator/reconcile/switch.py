"""The zero-downtime switch, executed: observe, ask `rollout.next_step`, carry it out.

`advance` is level-triggered and idempotent. Any trigger may call it -- a stage Deployment
or EndpointSlice changing, the safety-net timer, a spec change, a re-plan after a node
change -- because the step it takes is decided by the pure planner (`llmpipe_operator.
rollout`) from what it observes: wait for the target plan, switch the user-facing Service
to it once every stage is available, remove the plans nothing routes to, report. The
executor only carries the step out, in that order, under the pipeline's lock.

So the old plan's stages stay until the EndpointSlices show the new stage 0 ready: the
Service never has an empty endpoint set because of a switch. After the switch the old plan
drains: new requests reach the new plan, the old one finishes the requests it holds, then
its objects go: once its stage 0 reports none in progress (`busy`, which
`reconcile.drain`'s task reads and passes in), or at `spec.replan.drainSeconds` at the
latest. `Draining` and `Drained` Events say when, and why.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Any

from lightkube import AsyncClient

from llmpipe_operator import rollout, telemetry
from llmpipe_operator.k8s import api, events
from llmpipe_operator.manifests import endpoint, names
from llmpipe_operator.reconcile import capacity, errors, fetch, locks


async def advance(
    client: AsyncClient, *, namespace: str, name: str, busy: Mapping[str, int] | None = None
) -> str | None:
    """Take the next due step of the rollout; returns the plan hash now serving. `busy`:
    draining plan hash -> requests its stage 0 holds, as just read (absent: unknown)."""
    async with locks.pipeline_lock(namespace, name):
        # 1. observe the pipeline and everything it owns
        pipeline = await fetch.fetch_pipeline(client, namespace=namespace, name=name)
        if pipeline is None:
            locks.forget(namespace, name)
            capacity.release((namespace, name))
            telemetry.forget_pipeline(namespace, name)
            return None
        target = pipeline.status.get("planHash")
        if not target:
            return None
        observed = await observe(client, pipeline, target=str(target), busy=busy or {})
        # 2. decide
        action = rollout.next_step(observed)
        # 3. execute
        await execute(client, pipeline, action)
        return action.serving


async def observe(
    client: AsyncClient,
    pipeline: fetch.Pipeline,
    *,
    target: str,
    busy: Mapping[str, int] | None = None,
) -> rollout.Observed:
    ref = pipeline.ref
    async with errors.classified("observe the pipeline's objects"):
        children = await api.list_children(client, namespace=ref.namespace, pipeline=ref.name)
        pods = await api.list_pods(client, namespace=ref.namespace, pipeline=ref.name)
        slices = await api.list_endpoint_slices(
            client, namespace=ref.namespace, service=names.endpoint_service_name(ref)
        )
    return rollout.Observed(
        ref=ref,
        target=target,
        generation=pipeline.generation,
        status=pipeline.status,
        replan_spec=(pipeline.body.get("spec") or {}).get("replan"),
        children=children,
        pods=pods,
        slices=slices,
        now=datetime.datetime.now(datetime.UTC),
        busy=dict(busy or {}),
    )


async def execute(client: AsyncClient, pipeline: fetch.Pipeline, action: rollout.Action) -> None:
    """Carry out one step: switch, remove, report (enforcing nothing the planner did not)."""
    if action.switch is not None:
        await switch_to(client, pipeline, action.switch)
    for digest in action.drain_started:
        await events.post(
            client,
            pipeline.body,
            type="Normal",
            reason="Draining",
            message=f"plan {digest} no longer receives requests; it finishes the ones it "
            "serves, then is removed (at spec.replan.drainSeconds at the latest)",
        )
    for digest in action.drained:
        why = (
            "its stage 0 has no request in progress"
            if digest in action.emptied
            else "spec.replan.drainSeconds passed, or a stage is not available"
        )
        await events.post(
            client,
            pipeline.body,
            type="Normal",
            reason="Drained",
            message=f"plan {digest} drained ({why}); removing it",
        )
    if action.remove:
        async with errors.classified("remove old plans"):
            await api.delete_objects(client, list(action.remove))
    if action.report is None:
        return
    if action.write_report:
        ref = pipeline.ref
        async with errors.classified("report the rollout"):
            await api.patch_status(
                client, namespace=ref.namespace, name=ref.name, status=action.report
            )
    telemetry.set_phase(pipeline.ref.namespace, pipeline.ref.name, str(action.report["phase"]))


async def switch_to(client: AsyncClient, pipeline: fetch.Pipeline, switch: rollout.Switch) -> None:
    """Point the user-facing Service at the plan's stage 0 (one selector label changes)."""
    service = endpoint.build_endpoint_service(pipeline.ref, pipeline.spec, serving_digest=switch.to)
    async with errors.classified("switch the endpoint Service"):
        await api.apply_objects(client, [service])
    if switch.came_from:
        await events.post(
            client,
            pipeline.body,
            type="Normal",
            reason="Switched",
            message=f"endpoint moved from plan {switch.came_from} to plan {switch.to} "
            f"({switch.stages} stages available)",
        )


async def remove_unserved(client: AsyncClient, ref: names.PipelineRef) -> str | None:
    """Delete every plan except the one serving (if that one is fully deployed); when none
    serves, delete the endpoint Service too. Returns the serving plan hash, if any."""
    children = await api.list_children(client, namespace=ref.namespace, pipeline=ref.name)
    serving = endpoint.serving_digest(rollout.endpoint_service(children, ref))
    pods = await api.list_pods(client, namespace=ref.namespace, pipeline=ref.name)
    plan = rollout.plan_of(children, serving) if serving else None
    if serving and (
        plan is None
        or not all(
            a.available for a in rollout.availability(children, pods, digest=serving, plan=plan)
        )
    ):
        serving = None  # a first plan still coming up is "half-deployed": remove it
    await remove_plans(client, children, keep={serving} if serving else set())
    if serving is None:
        await api.delete_objects(client, [o for o in children if rollout.is_endpoint(o, ref)])
    return serving


async def remove_running(client: AsyncClient, ref: names.PipelineRef, *, keep: str) -> None:
    """Delete every plan's objects but `keep`'s, the serving one's too: for a ring that is
    broken (a stage's node is gone), whose stages' memory the new plan needs (the
    scheduler counts their requests until their pods are gone)."""
    async with errors.classified("list the broken plan's objects"):
        children = await api.list_children(client, namespace=ref.namespace, pipeline=ref.name)
    await remove_plans(client, children, keep={keep})


async def remove_plans(
    client: AsyncClient, children: Sequence[Mapping[str, Any]], *, keep: set[str | None]
) -> None:
    doomed = rollout.doomed_objects(children, keep=keep)
    async with errors.classified("remove old plans"):
        await api.delete_objects(client, doomed)
