"""The zero-downtime switch's planner: from what was observed, the next step. Pure.

`next_step(observed) -> Action` decides; `reconcile.switch.advance` observes (the
pipeline, its objects, pods and the endpoint Service's EndpointSlices), calls it and
carries the action out. Like LeaderWorkerSet's `ComputeNextStep`, the decision depends only
on the observation, so any trigger may ask for it and a repeated observation gives the
same step:

- the target plan (`status.planHash`) is not applied yet: wait;
- it is fully available and the Service routes elsewhere: switch the Service to it;
- a plan that is neither the target nor serving, and that no ready endpoint behind the
  Service belongs to any more, *drains*: it keeps running for the sequences it still
  serves from the first look that found it so (recorded in `status.drainingPlans`) until
  its stage 0 reports nothing in progress (`drain_over`: at the earliest
  DRAIN_MIN_SECONDS in) or `spec.replan.drainSeconds` passes, then is removed
  (Deployments, then Services, then the ConfigMap);
- the status report of the rollout (`status.rollout`), written when more than its
  timestamps changed.

No API client, no kopf, no clock: the observation carries the time.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llmpipe_operator import status
from llmpipe_operator.manifests import endpoint, names
from llmpipe_operator.planning import replan

Obj = Mapping[str, Any]
DELETE_ORDER = {"Deployment": 0, "Service": 1, "ConfigMap": 2}
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


@dataclass(frozen=True)
class Observed:
    """One look at a pipeline with a target plan, and at everything it owns."""

    ref: names.PipelineRef
    target: str
    """The plan being rolled out (`status.planHash`)."""
    generation: int
    status: Obj
    """The pipeline's `.status` as read."""
    replan_spec: Obj | None
    """`spec.replan` (the switch timeout)."""
    children: Sequence[Obj]
    """The objects the pipeline owns (Deployments, Services, ConfigMaps)."""
    pods: Sequence[Obj]
    slices: Sequence[Obj]
    """The endpoint Service's EndpointSlices."""
    now: datetime.datetime
    busy: Mapping[str, int] = dataclasses.field(default_factory=dict)
    """Draining plan hash -> the requests its stage 0 reported in progress at this look
    (`reconcile.drain` reads them); a plan whose stage 0 was not read is absent: unknown,
    which drains to the bound."""

    @property
    def conditions(self) -> list[Obj]:
        return list(self.status.get("conditions") or [])


@dataclass(frozen=True)
class Switch:
    """Point the endpoint Service at plan `to`'s stage 0."""

    to: str
    came_from: str | None
    """The plan it routed to before (None: a first plan, no Event)."""
    stages: int


@dataclass(frozen=True)
class Action:
    """The step for one observation; the executor carries out its parts in this order."""

    serving: str | None = None
    """The plan hash serving once the step is done (None: none, or waiting)."""
    switch: Switch | None = None
    remove: tuple[Obj, ...] = ()
    """Objects of plans nothing routes to, in deletion order."""
    report: dict[str, Any] | None = None
    """The status patch of the rollout (None: waiting, nothing to report)."""
    write_report: bool = False
    """False when the report would change nothing but timestamps."""
    drain_started: tuple[str, ...] = ()
    """Plans that began draining at this look (an Event each)."""
    drained: tuple[str, ...] = ()
    """Draining plans that are done: their objects are in `remove` (an Event each)."""
    emptied: tuple[str, ...] = ()
    """Those of `drained` that ended early, their stage 0 empty (the rest met the bound, or
    were broken)."""


WAIT = Action()
"""The target's objects are not applied yet (the deploy step will be back)."""


def next_step(observed: Observed) -> Action:
    """What to do now, from what was observed."""
    target = observed.target
    plan = plan_of(observed.children, target)
    if plan is None:
        return WAIT
    serving = endpoint.serving_digest(endpoint_service(observed.children, observed.ref))
    ready_target = availability(observed.children, observed.pods, digest=target, plan=plan)
    switch = None
    if serving != target and all(a.available for a in ready_target):
        switch = Switch(to=target, came_from=serving, stages=len(plan["stages"]))
        serving = target
    routed = routed_digests(observed.slices, observed.ref)
    unserved = plan_digests(observed.children) - {target, serving, *routed}
    draining, drained, emptied = drain(observed, unserved)
    doomed = doomed_objects(observed.children, keep={target, serving, *routed, *draining})
    report = rollout_report(observed, plan, serving=serving, ready_target=ready_target)
    previous = observed.status.get("drainingPlans") or {}
    report["drainingPlans"] = draining or (None if previous else {})
    return Action(
        serving=serving,
        switch=switch,
        remove=tuple(doomed),
        report=report,
        write_report=report["phase"] != observed.status.get("phase")
        or changed(report, observed.status)
        or (draining or {}) != previous,
        drain_started=tuple(sorted(set(draining) - set(previous))),
        drained=tuple(sorted(drained)),
        emptied=tuple(sorted(emptied)),
    )


def drain(observed: Observed, unserved: set[str]) -> tuple[dict[str, str], set[str], set[str]]:
    """Split the plans nothing routes to: still draining ({digest: since}), drained, and
    of those the ones whose stage 0 emptied before the bound. A plan with a stage not
    available cannot finish anything (a broken ring): it goes now."""
    bound = drain_seconds(observed.replan_spec)
    previous = observed.status.get("drainingPlans") or {}
    draining: dict[str, str] = {}
    drained: set[str] = set()
    emptied: set[str] = set()
    for digest in unserved:
        plan = plan_of(observed.children, digest)
        if plan is None or not all(
            a.available
            for a in availability(observed.children, observed.pods, digest=digest, plan=plan)
        ):
            drained.add(digest)
            continue
        since = str(previous.get(digest) or observed.now.strftime(TIME_FORMAT))
        started = datetime.datetime.strptime(since, TIME_FORMAT).replace(tzinfo=datetime.UTC)
        over = drain_over(
            draining_s=(observed.now - started).total_seconds(),
            bound_s=bound,
            busy=observed.busy.get(digest) if digest in previous else None,
        )
        if over is None:
            draining[digest] = since
        else:
            drained.add(digest)
            if over == "empty":
                emptied.add(digest)
    return draining, drained, emptied


DRAIN_MIN_SECONDS = 5.0
"""A drain ends early no sooner than this after it began: kube-proxy moves new connections
off the old stage 0 a moment after its endpoint left the Service (it syncs the rules at
most once a second, later on a busy node), so an empty stage 0 in the first seconds may
still be about to receive a request."""


def drain_over(*, draining_s: float, bound_s: float, busy: int | None) -> str | None:
    """Whether a drain that began `draining_s` ago is over: "bound" once
    `spec.replan.drainSeconds` passed, "empty" when its stage 0 reported nothing in
    progress (`busy` 0; None: not read) and DRAIN_MIN_SECONDS passed, else None."""
    if draining_s >= bound_s:
        return "bound"
    if busy == 0 and draining_s >= DRAIN_MIN_SECONDS:
        return "empty"
    return None


def drain_seconds(replan_spec: Obj | None) -> float:
    try:
        return replan.ReplanSettings.from_spec(replan_spec).drain_seconds
    except ValueError:  # the spec's own handler reports it; drain by the default meanwhile
        return replan.ReplanSettings().drain_seconds


def plan_digests(children: Sequence[Obj]) -> set[str]:
    """Every plan hash that owns an object (the endpoint Service belongs to none)."""
    return {d for d in (digest_of(o) for o in children) if d}


def rollout_report(
    observed: Observed,
    plan: Obj,
    *,
    serving: str | None,
    ready_target: Sequence[status.StageAvailability],
) -> dict[str, Any]:
    target = observed.target
    served_plan = plan_of(observed.children, serving) if serving and serving != target else None
    ready_serving = (
        availability(observed.children, observed.pods, digest=serving, plan=served_plan)
        if served_plan is not None and serving
        else []
    )
    stalled = None
    if serving != target:
        not_ready = [
            f"s{a.index}: {a.reason or 'not available'}" for a in ready_target if not a.available
        ]
        stalled = replan.stalled_switch(
            observed.status, observed.replan_spec, not_ready, now=observed.now
        )
    rollout = status.Rollout(
        digest=target,
        serving_digest=serving,
        target=ready_target,
        serving=ready_serving,
        stalled=stalled,
    )
    now = observed.now.strftime(TIME_FORMAT)
    conds = status.Conditions(observed.generation, now, observed.conditions)
    return status.rollout(plan, rollout, conds)


# -- reading the observed objects -------------------------------------------------------------
def doomed_objects(children: Sequence[Obj], *, keep: set[str | None]) -> list[Obj]:
    """The objects of every plan but `keep`'s, in deletion order."""
    doomed = [o for o in children if digest_of(o) is not None and digest_of(o) not in keep]
    return sorted(doomed, key=lambda o: DELETE_ORDER.get(str(o.get("kind")), 9))


def plan_of(children: Sequence[Obj], digest: str | None) -> dict[str, Any] | None:
    """The plan JSON a plan hash's ConfigMap holds."""
    for obj in children:
        if obj.get("kind") == "ConfigMap" and digest_of(obj) == digest:
            text = (obj.get("data") or {}).get("plan.json")
            return dict(json.loads(text)) if text else None
    return None


def availability(
    children: Sequence[Obj], pods: Sequence[Obj], *, digest: str, plan: Obj
) -> list[status.StageAvailability]:
    """Per stage of `plan`: is its Deployment's replica available, and if not, why."""
    deployments = {
        index_of(o): o for o in children if o.get("kind") == "Deployment" and digest_of(o) == digest
    }
    result = []
    for stage in plan["stages"]:
        index = int(stage["index"])
        deployment = deployments.get(index)
        if deployment is None:
            result.append(status.StageAvailability(index, False, "no Deployment"))
            continue
        available = is_available(deployment)
        reason = "" if available else pod_problem(pods, digest, index)
        result.append(status.StageAvailability(index, available, reason))
    return result


def routed_digests(slices: Sequence[Obj], ref: names.PipelineRef) -> set[str]:
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


def is_available(deployment: Obj) -> bool:
    meta, st = deployment.get("metadata") or {}, deployment.get("status") or {}
    current = int(st.get("observedGeneration") or 0) >= int(meta.get("generation") or 0)
    return current and int(st.get("availableReplicas") or 0) >= 1


def pod_problem(pods: Sequence[Obj], digest: str, index: int) -> str:
    """The most telling reason a stage's pod is not ready (Unschedulable, ImagePull...)."""
    mine = [p for p in pods if digest_of(p) == digest and index_of(p) == index]
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


def digest_of(obj: Obj) -> str | None:
    return ((obj.get("metadata") or {}).get("labels") or {}).get(names.LABEL_PLAN_HASH)


def index_of(obj: Obj) -> int:
    value = ((obj.get("metadata") or {}).get("labels") or {}).get(names.LABEL_STAGE_INDEX)
    return int(value) if value is not None else -1


def is_endpoint(obj: Obj, ref: names.PipelineRef) -> bool:
    name = (obj.get("metadata") or {}).get("name")
    return obj.get("kind") == "Service" and name == names.endpoint_service_name(ref)


def endpoint_service(children: Sequence[Obj], ref: names.PipelineRef) -> dict[str, Any] | None:
    return next((dict(o) for o in children if is_endpoint(o, ref)), None)


def changed(patch: Obj, current: Obj) -> bool:
    """Whether a status write would change more than timestamps."""
    keys = ("ready", "servingPlanHash", "plan", "stageCount", "bottleneck", "estimates")
    if any(patch.get(k) != current.get(k) for k in keys):
        return True

    def brief(conds: Any) -> list[tuple[Any, ...]]:
        return [
            (c.get("type"), c.get("status"), c.get("reason"), c.get("message")) for c in conds or []
        ]

    return brief(patch.get("conditions")) != brief(current.get("conditions"))
