"""The zero-downtime switch: move the user-facing Service to a fully available plan, then
remove the plans nothing routes to.

`advance` is level-triggered and idempotent: it reads the pipeline, its objects, pods and
the endpoint Service's EndpointSlices, and takes whatever step is due. Any trigger may call
it -- a stage Deployment or EndpointSlice changing, the safety-net timer, a spec change, a
re-plan after a node change -- because what it does depends only on what it observes:

- the target plan (`status.planHash`) is not fully available: wait (report progress);
- it is, and the Service routes elsewhere: move the Service's selector to its stage 0;
- a plan that is neither the target nor serving, and has no ready endpoint behind the
  Service any more, is deleted (Deployments, then Services, then the plan ConfigMap).

So the old plan's stages stay until the EndpointSlices show the new stage 0 ready: the
Service never has an empty endpoint set because of a switch.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from typing import Any

import kopf
from lightkube import AsyncClient

from llmpipe_operator import status, telemetry
from llmpipe_operator.k8s import api
from llmpipe_operator.manifests import endpoint, names
from llmpipe_operator.planning import replan
from llmpipe_operator.reconcile import capacity, errors, fetch, locks

_DELETE_ORDER = {"Deployment": 0, "Service": 1, "ConfigMap": 2}


async def advance(client: AsyncClient, *, namespace: str, name: str) -> str | None:
    """Take the next due step of the rollout; returns the plan hash now serving."""
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
        async with errors.classified("observe the pipeline's objects"):
            children = await api.list_children(client, namespace=namespace, pipeline=name)
            pods = await api.list_pods(client, namespace=namespace, pipeline=name)
            slices = await api.list_endpoint_slices(
                client, namespace=namespace, service=names.endpoint_service_name(pipeline.ref)
            )
        plan = plan_of(children, target)
        if plan is None:
            return None  # the target's objects are not applied yet; deploy_plan will be back
        serving = endpoint.serving_digest(_endpoint_service(children, pipeline.ref))
        ready_target = availability(children, pods, digest=target, plan=plan)
        # 2. switch when every stage of the target plan is available
        if serving != target and all(a.available for a in ready_target):
            await switch_to(client, pipeline, target, previous=serving, plan=plan)
            serving = target
        # 3. remove plans that neither serve nor roll out
        routed = routed_digests(slices, pipeline.ref)
        await remove_plans(client, children, keep={target, serving, *routed})
        # 4. report
        served_plan = plan_of(children, serving) if serving and serving != target else None
        ready_serving = (
            availability(children, pods, digest=serving, plan=served_plan)
            if served_plan is not None and serving
            else []
        )
        patch = status.rollout(
            plan,
            digest=target,
            serving_digest=serving,
            target=ready_target,
            serving=ready_serving,
            generation=pipeline.generation,
            now=fetch.now(),
            previous=pipeline.conditions,
            stalled=stalled_switch(pipeline, ready_target) if serving != target else None,
        )
        if patch["phase"] != pipeline.status.get("phase") or _changed(patch, pipeline.status):
            async with errors.classified("report the rollout"):
                await api.patch_status(client, namespace=namespace, name=name, status=patch)
        telemetry.set_phase(namespace, name, str(patch["phase"]))
        return serving


def stalled_switch(
    pipeline: fetch.Pipeline, target: Sequence[status.StageAvailability]
) -> str | None:
    """Degraded message when the switch ran past spec.replan.switchTimeoutSeconds."""
    not_ready = [f"s{a.index}: {a.reason or 'not available'}" for a in target if not a.available]
    spec_replan = (pipeline.body.get("spec") or {}).get("replan")
    now = datetime.datetime.now(datetime.UTC)
    return replan.stalled_switch(pipeline.status, spec_replan, not_ready, now=now)


async def switch_to(
    client: AsyncClient,
    pipeline: fetch.Pipeline,
    digest: str,
    *,
    previous: str | None,
    plan: Mapping[str, Any],
) -> None:
    """Point the user-facing Service at `digest`'s stage 0 (one selector label changes)."""
    service = endpoint.build_endpoint_service(pipeline.ref, pipeline.spec, serving_digest=digest)
    async with errors.classified("switch the endpoint Service"):
        await api.apply_objects(client, [service])
    if previous:
        kopf.event(
            fetch.events_body(pipeline.body),
            type="Normal",
            reason="Switched",
            message=f"endpoint moved from plan {previous} to plan {digest} "
            f"({len(plan['stages'])} stages available)",
        )


async def remove_unserved(client: AsyncClient, ref: names.PipelineRef) -> str | None:
    """Delete every plan except the one serving (if that one is fully deployed); when none
    serves, delete the endpoint Service too. Returns the serving plan hash, if any."""
    children = await api.list_children(client, namespace=ref.namespace, pipeline=ref.name)
    serving = endpoint.serving_digest(_endpoint_service(children, ref))
    pods = await api.list_pods(client, namespace=ref.namespace, pipeline=ref.name)
    plan = plan_of(children, serving) if serving else None
    if serving and (
        plan is None
        or not all(a.available for a in availability(children, pods, digest=serving, plan=plan))
    ):
        serving = None  # a first plan still coming up is "half-deployed": remove it
    await remove_plans(client, children, keep={serving} if serving else set())
    if serving is None:
        await api.delete_objects(client, [o for o in children if _is_endpoint(o, ref)])
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
    doomed = [o for o in children if _digest(o) is not None and _digest(o) not in keep]
    doomed.sort(key=lambda o: _DELETE_ORDER.get(str(o.get("kind")), 9))
    async with errors.classified("remove old plans"):
        await api.delete_objects(client, doomed)


def plan_of(children: Sequence[Mapping[str, Any]], digest: str | None) -> dict[str, Any] | None:
    """The plan JSON a plan hash's ConfigMap holds."""
    for obj in children:
        if obj.get("kind") == "ConfigMap" and _digest(obj) == digest:
            text = (obj.get("data") or {}).get("plan.json")
            return dict(json.loads(text)) if text else None
    return None


def availability(
    children: Sequence[Mapping[str, Any]],
    pods: Sequence[Mapping[str, Any]],
    *,
    digest: str,
    plan: Mapping[str, Any],
) -> list[status.StageAvailability]:
    """Per stage of `plan`: is its Deployment's replica available, and if not, why."""
    deployments = {
        _index(o): o for o in children if o.get("kind") == "Deployment" and _digest(o) == digest
    }
    result = []
    for stage in plan["stages"]:
        index = int(stage["index"])
        deployment = deployments.get(index)
        if deployment is None:
            result.append(status.StageAvailability(index, False, "no Deployment"))
            continue
        available = _is_available(deployment)
        reason = "" if available else _pod_problem(pods, digest, index)
        result.append(status.StageAvailability(index, available, reason))
    return result


def routed_digests(slices: Sequence[Mapping[str, Any]], ref: names.PipelineRef) -> set[str]:
    """Plan hashes whose stage-0 pod is a ready endpoint of the user-facing Service now."""
    prefix = f"{ref.name}-"
    found = set()
    for item in slices:
        for ep in item.get("endpoints") or []:
            target = (ep.get("targetRef") or {}).get("name", "")
            ready = (ep.get("conditions") or {}).get("ready")
            if ready and target.startswith(prefix):
                digest = target[len(prefix) :].split("-", 1)[0]
                if len(digest) == names.HASH_LENGTH:
                    found.add(digest)
    return found


def _is_available(deployment: Mapping[str, Any]) -> bool:
    meta, st = deployment.get("metadata") or {}, deployment.get("status") or {}
    current = int(st.get("observedGeneration") or 0) >= int(meta.get("generation") or 0)
    return current and int(st.get("availableReplicas") or 0) >= 1


def _pod_problem(pods: Sequence[Mapping[str, Any]], digest: str, index: int) -> str:
    """The most telling reason a stage's pod is not ready (Unschedulable, ImagePull...)."""
    mine = [p for p in pods if _digest(p) == digest and _index(p) == index]
    if not mine:
        return "no pod yet"
    pod_status = mine[0].get("status") or {}
    for cond in pod_status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            return f"{cond.get('reason', 'Unschedulable')}: {cond.get('message', '')}".strip()
    for container in pod_status.get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting")
        if waiting:
            return f"{waiting.get('reason', 'Waiting')}: {waiting.get('message', '')}".strip(": ")
    return f"pod {pod_status.get('phase', 'Pending')}, not ready"


def _digest(obj: Mapping[str, Any]) -> str | None:
    return ((obj.get("metadata") or {}).get("labels") or {}).get(names.LABEL_PLAN_HASH)


def _index(obj: Mapping[str, Any]) -> int:
    value = ((obj.get("metadata") or {}).get("labels") or {}).get(names.LABEL_STAGE_INDEX)
    return int(value) if value is not None else -1


def _is_endpoint(obj: Mapping[str, Any], ref: names.PipelineRef) -> bool:
    return obj.get("kind") == "Service" and (obj.get("metadata") or {}).get(
        "name"
    ) == names.endpoint_service_name(ref)


def _endpoint_service(
    children: Sequence[Mapping[str, Any]], ref: names.PipelineRef
) -> dict[str, Any] | None:
    return next((dict(o) for o in children if _is_endpoint(o, ref)), None)


def _changed(patch: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    """Skip a status write that would change nothing but timestamps."""
    keys = ("ready", "servingPlanHash", "plan", "stageCount", "bottleneck", "estimates")
    if any(patch.get(k) != current.get(k) for k in keys):
        return True

    def brief(conds: Any) -> list[tuple[Any, ...]]:
        return [
            (c.get("type"), c.get("status"), c.get("reason"), c.get("message")) for c in conds or []
        ]

    return brief(patch.get("conditions")) != brief(current.get("conditions"))
