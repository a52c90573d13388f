"""Status of an LLMPipeline from what the operator observed. Pure: data in, status dicts out.

Every function returns a merge patch for `.status` (conditions as a whole list, each keeping
its lastTransitionTime while its status does not change), so the reconcile steps can write
it with one PATCH. Phases:

- Pending: accepted, nothing planned yet.      - Planning: nodes observed, planning.
- Deploying: a plan is applied, its stages are not all available yet.
- Ready: every stage of the served plan is available and the endpoint routes to it.
- Degraded: something is wrong but a plan still serves (a stage down, a re-plan that failed).
- Failed: nothing can serve (invalid spec, no feasible plan).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

PLANNED = "Planned"
READY = "Ready"
DEGRADED = "Degraded"

REASON_INVALID_SPEC = "InvalidSpec"
REASON_POLICY_VIOLATION = "PolicyViolation"
REASON_FORBIDDEN = "Forbidden"
REASON_INSUFFICIENT_MEMORY = "InsufficientMemory"
REASON_NO_ELIGIBLE_NODES = "NoEligibleNodes"
REASON_PLANNED = "Planned"
REASON_STAGES_AVAILABLE = "StagesAvailable"
REASON_STAGES_PENDING = "StagesPending"
REASON_STAGE_UNAVAILABLE = "StageUnavailable"
REASON_SWITCHING = "SwitchingPlan"
REASON_AS_PLANNED = "AsPlanned"
REASON_SWITCH_TIMED_OUT = "SwitchTimedOut"


MESSAGE_LIMIT = 1024
"""Longest condition or Event message we write: an Event's note is capped at 1 KiB by
events.k8s.io, and a status that repeats a 100 KiB spec value helps no one."""


def truncate(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """`text`, cut to at most `limit` characters with a note of how much was left out."""
    if len(text) <= limit:
        return text
    cut = max(0, limit - 40)  # the note takes at most ~35 characters
    return f"{text[:cut]}... ({len(text) - cut} more characters)"


@dataclass(frozen=True)
class StageAvailability:
    """One stage Deployment as observed: is its single replica available?"""

    index: int
    available: bool
    reason: str = ""
    """Why not, when known (e.g. the pod is Pending: Unschedulable)."""


def format_bytes(value: int) -> str:
    """Binary units, one decimal: 1503238553 -> '1.4Gi'."""
    size = float(value)
    for unit in ("", "Ki", "Mi", "Gi", "Ti"):
        if abs(size) < 1024 or unit == "Ti":
            return f"{size:.0f}{unit}" if unit == "" else f"{size:.1f}{unit}"
        size /= 1024
    return f"{size:.1f}Ti"  # pragma: no cover - loop always returns


def format_seconds(value: float) -> str:
    """Step times are milliseconds for real models; keep three significant digits."""
    ms = value * 1000
    if ms >= 100:
        return f"{ms:.0f}ms"
    if ms >= 1:
        return f"{ms:.1f}ms"
    return f"{ms * 1000:.0f}us"


def bottleneck_text(plan: Mapping[str, Any]) -> str:
    """The slowest stage's step time and where it runs, e.g. '18.2ms s1@orin-b'."""
    stages = plan["stages"]
    if not stages:
        return ""
    slowest = max(
        stages, key=lambda s: max(float(s["computeSeconds"]), float(s["transferSeconds"]))
    )
    step = max(float(slowest["computeSeconds"]), float(slowest["transferSeconds"]))
    return f"{format_seconds(step)} s{slowest['index']}@{slowest['node']}"


def plan_summary(
    plan: Mapping[str, Any], *, availability: Sequence[StageAvailability] = ()
) -> dict[str, Any]:
    """stage -> node, layers, memory, as `status.plan`."""
    ready = {a.index: a.available for a in availability}
    return {
        "stages": [
            {
                "index": int(s["index"]),
                "node": str(s["node"]),
                "layerStart": int(s["layerStart"]),
                "layerEnd": int(s["layerEnd"]),
                "memoryBytes": int(s["memoryBytes"]),
                "memory": format_bytes(int(s["memoryBytes"])),
                "ready": ready.get(int(s["index"]), False),
            }
            for s in plan["stages"]
        ]
    }


def estimates(plan: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "objective": str(plan["objective"]),
        "bottleneckSeconds": float(plan["bottleneckSeconds"]),
        "tokenLatencySeconds": float(plan["tokenLatencySeconds"]),
        "estTokensPerSecond": round(float(plan["estTokensPerSecond"]), 1),
    }


def describe_plan(plan: Mapping[str, Any]) -> str:
    """One line for Events and condition messages."""
    chain = ", ".join(
        f"s{s['index']} {s['node']} [{s['layerStart']},{s['layerEnd']})" for s in plan["stages"]
    )
    count = len(plan["stages"])
    return (
        f"{count} stage{'s' if count != 1 else ''}: {chain}; bottleneck "
        f"{bottleneck_text(plan)}, est {float(plan['estTokensPerSecond']):.1f} tok/s "
        f"({plan['objective']})"
    )


def condition(
    kind: str,
    status: bool,
    reason: str,
    message: str,
    *,
    generation: int,
    now: str,
    previous: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """A condition whose lastTransitionTime only moves when its status flips."""
    value = "True" if status else "False"
    earlier = next((c for c in previous if c.get("type") == kind), None)
    since = earlier.get("lastTransitionTime") if earlier and earlier.get("status") == value else now
    return {
        "type": kind,
        "status": value,
        "reason": reason,
        "message": truncate(message),
        "lastTransitionTime": since or now,
        "observedGeneration": generation,
    }


def merge_conditions(
    previous: Sequence[Mapping[str, Any]], updates: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Replace conditions by type, keep the others, in a stable order."""
    by_type = {str(c.get("type")): dict(c) for c in previous}
    by_type.update({str(c["type"]): c for c in updates})
    order = [PLANNED, READY, DEGRADED]
    return sorted(
        by_type.values(),
        key=lambda c: (order.index(c["type"]) if c["type"] in order else 99, c["type"]),
    )


def no_plan_fields() -> dict[str, Any]:
    """The status fields that describe a deployed plan, cleared: nothing is deployed (a
    refused spec, or the last plan's objects are gone)."""
    return {
        "planHash": None,
        "servingPlanHash": None,
        "stageCount": 0,
        "ready": None,
        "bottleneck": None,
        "estimates": None,
        "plan": None,
        "endpoint": None,
    }


def invalid_spec(
    message: str,
    *,
    generation: int,
    now: str,
    previous: Sequence[Mapping[str, Any]] = (),
    reason: str = REASON_INVALID_SPEC,
) -> dict[str, Any]:
    """The spec cannot be acted on; nothing is planned or deployed for it. `reason` is
    InvalidSpec, or PolicyViolation for a spec the cluster's policy refuses."""
    conds = [
        condition(
            PLANNED,
            False,
            reason,
            message,
            generation=generation,
            now=now,
            previous=previous,
        ),
        condition(
            READY,
            False,
            reason,
            "no plan",
            generation=generation,
            now=now,
            previous=previous,
        ),
    ]
    return {
        "observedGeneration": generation,
        "phase": "Failed",
        "conditions": merge_conditions(previous, conds),
    }


def forbidden(
    message: str, *, generation: int, now: str, previous: Sequence[Mapping[str, Any]] = ()
) -> dict[str, Any]:
    """Planned, but the operator may not write the plan's objects in this namespace (no
    RoleBinding grants it): Pending until an admin grants it; retried slowly."""
    conds = [
        condition(
            PLANNED,
            False,
            REASON_FORBIDDEN,
            message,
            generation=generation,
            now=now,
            previous=previous,
        )
    ]
    return {
        "observedGeneration": generation,
        "phase": "Pending",
        "conditions": merge_conditions(previous, conds),
    }


def infeasible(
    message: str,
    *,
    generation: int,
    now: str,
    serving: bool,
    previous: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """No plan fits. When an earlier plan still serves, it keeps serving: Degraded."""
    conds = [
        condition(
            PLANNED,
            False,
            REASON_INSUFFICIENT_MEMORY,
            message,
            generation=generation,
            now=now,
            previous=previous,
        )
    ]
    if serving:
        conds.append(
            condition(
                DEGRADED,
                True,
                REASON_INSUFFICIENT_MEMORY,
                f"serving the previous plan: {message}",
                generation=generation,
                now=now,
                previous=previous,
            )
        )
        phase = "Degraded"
    else:
        conds.append(
            condition(
                READY,
                False,
                REASON_INSUFFICIENT_MEMORY,
                "no plan fits",
                generation=generation,
                now=now,
                previous=previous,
            )
        )
        phase = "Failed"
    return {
        "observedGeneration": generation,
        "phase": phase,
        "conditions": merge_conditions(previous, conds),
    }


def no_nodes(
    message: str,
    *,
    generation: int,
    now: str,
    serving: bool,
    previous: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """No node may run a stage (yet): Pending, waiting for nodes; a serving plan keeps
    serving (Degraded)."""
    conds = [
        condition(
            PLANNED,
            False,
            REASON_NO_ELIGIBLE_NODES,
            message,
            generation=generation,
            now=now,
            previous=previous,
        )
    ]
    if serving:
        conds.append(
            condition(
                DEGRADED,
                True,
                REASON_NO_ELIGIBLE_NODES,
                f"serving the previous plan: {message}",
                generation=generation,
                now=now,
                previous=previous,
            )
        )
    else:
        conds.append(
            condition(
                READY,
                False,
                REASON_NO_ELIGIBLE_NODES,
                "no plan",
                generation=generation,
                now=now,
                previous=previous,
            )
        )
    return {
        "observedGeneration": generation,
        "phase": "Degraded" if serving else "Pending",
        "conditions": merge_conditions(previous, conds),
    }


def planned(
    plan: Mapping[str, Any],
    *,
    digest: str,
    generation: int,
    now: str,
    endpoint: str,
    previous: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """A feasible plan was computed and applied; its stages are coming up."""
    conds = [
        condition(
            PLANNED,
            True,
            REASON_PLANNED,
            describe_plan(plan),
            generation=generation,
            now=now,
            previous=previous,
        )
    ]
    return {
        "observedGeneration": generation,
        "planHash": digest,
        "stageCount": len(plan["stages"]),
        "bottleneck": bottleneck_text(plan),
        "estimates": estimates(plan),
        "plan": plan_summary(plan),
        "endpoint": endpoint,
        "conditions": merge_conditions(previous, conds),
    }


_KEEPS_SERVING = (REASON_INSUFFICIENT_MEMORY, REASON_NO_ELIGIBLE_NODES)


def _unplanned_generation(
    previous: Sequence[Mapping[str, Any]], generation: int
) -> Mapping[str, Any] | None:
    """The Planned=False condition of this generation that leaves the earlier plan serving
    (no plan fits, no node eligible), if any: a rollout report of that earlier plan must not
    turn the pipeline back to Ready as if the current spec ran."""
    for c in previous:
        if (
            c.get("type") == PLANNED
            and c.get("status") == "False"
            and c.get("reason") in _KEEPS_SERVING
            and c.get("observedGeneration") == generation
        ):
            return c
    return None


def rollout(
    plan: Mapping[str, Any],
    *,
    digest: str,
    serving_digest: str | None,
    target: Sequence[StageAvailability],
    serving: Sequence[StageAvailability],
    generation: int,
    now: str,
    previous: Sequence[Mapping[str, Any]] = (),
    stalled: str | None = None,
) -> dict[str, Any]:
    """Ready/Degraded/Deploying from the availability of the target and the served plan.

    `target` is the plan being rolled out (= `digest`); `serving` the one the endpoint
    routes to (empty when it is the same plan or there is none). `stalled` is set when the
    switch ran past its timeout (planning.replan.stalled_switch): the served plan keeps
    serving and the pipeline is Degraded with that message.
    """
    total = len(plan["stages"])
    up = sum(1 for a in target if a.available)
    missing = [a for a in target if not a.available]
    switching = serving_digest is not None and serving_digest != digest
    serving_ok = bool(serving) and all(a.available for a in serving)
    if not missing and not switching:
        phase, ready = (
            "Ready",
            condition(
                READY,
                True,
                REASON_STAGES_AVAILABLE,
                f"all {total} stages available",
                generation=generation,
                now=now,
                previous=previous,
            ),
        )
        unplanned = _unplanned_generation(previous, generation)
        degraded = condition(
            DEGRADED,
            unplanned is not None,
            REASON_AS_PLANNED if unplanned is None else str(unplanned["reason"]),
            "running as planned"
            if unplanned is None
            else f"serving the previous plan: {unplanned.get('message', '')}",
            generation=generation,
            now=now,
            previous=previous,
        )
        if unplanned is not None:
            phase = "Degraded"
    elif switching and serving_ok:
        phase, ready = (
            "Deploying",
            condition(
                READY,
                True,
                REASON_SWITCHING,
                f"serving plan {serving_digest} while plan {digest} comes up ({up}/{total})",
                generation=generation,
                now=now,
                previous=previous,
            ),
        )
        degraded = condition(
            DEGRADED,
            stalled is not None,
            REASON_SWITCH_TIMED_OUT if stalled else REASON_SWITCHING,
            stalled or "previous plan serving",
            generation=generation,
            now=now,
            previous=previous,
        )
        if stalled:
            phase = "Degraded"
    else:
        ready_was_true = any(c.get("type") == READY and c.get("status") == "True" for c in previous)
        waiting = "; ".join(f"s{a.index}: {a.reason or 'not available'}" for a in missing)
        reason = REASON_STAGE_UNAVAILABLE if ready_was_true else REASON_STAGES_PENDING
        phase = "Degraded" if ready_was_true else "Deploying"
        ready = condition(
            READY,
            False,
            reason,
            f"{up}/{total} stages available; {waiting}",
            generation=generation,
            now=now,
            previous=previous,
        )
        degraded = condition(
            DEGRADED,
            ready_was_true,
            reason,
            waiting if ready_was_true else "rolling out",
            generation=generation,
            now=now,
            previous=previous,
        )
    return {
        "phase": phase,
        "ready": f"{up}/{total}",
        "servingPlanHash": serving_digest,
        "stageCount": total,
        "bottleneck": bottleneck_text(plan),
        "estimates": estimates(plan),
        "plan": plan_summary(plan, availability=target),
        "conditions": merge_conditions(previous, [ready, degraded]),
    }
