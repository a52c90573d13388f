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

from llmpipe_operator.planning import speed

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
    """stage -> node, layers, memory (of its device, and of it the draft model's on stage
    0), device, as `status.plan`."""
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
                # plans from before devices have none: CPU stages
                "device": str(s.get("device", "cpu")),
                "gpus": int(s.get("gpus", 0)),
                "ready": ready.get(int(s["index"]), False),
                **_draft_memory(s),
            }
            for s in plan["stages"]
        ]
    }


def _draft_memory(stage: Mapping[str, Any]) -> dict[str, Any]:
    """Stage 0's draft model's share of its memory (spec.model.draft); nothing without one."""
    draft = int(stage.get("draftMemoryBytes", 0))
    if not draft:
        return {}
    return {"draftMemoryBytes": draft, "draftMemory": format_bytes(draft)}


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
        "measured": None,
        "plan": None,
        "endpoint": None,
    }


@dataclass(frozen=True)
class Conditions:
    """The conditions of one status report, bound once to what each of them needs: the
    generation observed, the report's time and the conditions the pipeline had (a
    condition keeps its lastTransitionTime while its status does not flip)."""

    generation: int
    now: str
    previous: Sequence[Mapping[str, Any]] = ()

    def of(self, kind: str, status: bool, reason: str, message: str) -> dict[str, Any]:
        return condition(
            kind,
            status,
            reason,
            message,
            generation=self.generation,
            now=self.now,
            previous=self.previous,
        )

    def merged(self, *updates: dict[str, Any]) -> list[dict[str, Any]]:
        """The whole conditions list: the earlier ones with `updates` in their place."""
        return merge_conditions(self.previous, updates)

    def report(self, phase: str, *updates: dict[str, Any]) -> dict[str, Any]:
        """A status patch of this generation: its phase and conditions."""
        return {
            "observedGeneration": self.generation,
            "phase": phase,
            "conditions": self.merged(*updates),
        }

    def was(self, kind: str, status: bool) -> bool:
        """Whether the pipeline had condition `kind` at `status` before this report."""
        value = "True" if status else "False"
        return any(c.get("type") == kind and c.get("status") == value for c in self.previous)


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
    conds = Conditions(generation, now, previous)
    return conds.report(
        "Failed",
        conds.of(PLANNED, False, reason, message),
        conds.of(READY, False, reason, "no plan"),
    )


def forbidden(
    message: str, *, generation: int, now: str, previous: Sequence[Mapping[str, Any]] = ()
) -> dict[str, Any]:
    """Planned, but the operator may not write the plan's objects in this namespace (no
    RoleBinding grants it): Pending until an admin grants it; retried slowly."""
    conds = Conditions(generation, now, previous)
    return conds.report("Pending", conds.of(PLANNED, False, REASON_FORBIDDEN, message))


def _not_planned(
    conds: Conditions, reason: str, message: str, *, serving: bool, not_ready: str
) -> list[dict[str, Any]]:
    """Planned=False for `reason`; with a plan still serving Degraded, else not Ready."""
    planned = conds.of(PLANNED, False, reason, message)
    if serving:
        return [planned, conds.of(DEGRADED, True, reason, f"serving the previous plan: {message}")]
    return [planned, conds.of(READY, False, reason, not_ready)]


def infeasible(
    message: str,
    *,
    generation: int,
    now: str,
    serving: bool,
    previous: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """No plan fits. When an earlier plan still serves, it keeps serving: Degraded."""
    conds = Conditions(generation, now, previous)
    updates = _not_planned(
        conds, REASON_INSUFFICIENT_MEMORY, message, serving=serving, not_ready="no plan fits"
    )
    return conds.report("Degraded" if serving else "Failed", *updates)


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
    conds = Conditions(generation, now, previous)
    updates = _not_planned(
        conds, REASON_NO_ELIGIBLE_NODES, message, serving=serving, not_ready="no plan"
    )
    return conds.report("Degraded" if serving else "Pending", *updates)


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
    conds = Conditions(generation, now, previous)
    return {
        "observedGeneration": generation,
        "planHash": digest,
        "stageCount": len(plan["stages"]),
        "bottleneck": bottleneck_text(plan),
        "estimates": estimates(plan),
        "plan": plan_summary(plan),
        "endpoint": endpoint,
        "conditions": conds.merged(conds.of(PLANNED, True, REASON_PLANNED, describe_plan(plan))),
    }


_KEEPS_SERVING = (REASON_INSUFFICIENT_MEMORY, REASON_NO_ELIGIBLE_NODES)


def _unplanned_generation(conds: Conditions) -> Mapping[str, Any] | None:
    """The Planned=False condition of this generation that leaves the earlier plan serving
    (no plan fits, no node eligible), if any: a rollout report of that earlier plan must not
    turn the pipeline back to Ready as if the current spec ran."""
    for c in conds.previous:
        if (
            c.get("type") == PLANNED
            and c.get("status") == "False"
            and c.get("reason") in _KEEPS_SERVING
            and c.get("observedGeneration") == conds.generation
        ):
            return c
    return None


@dataclass(frozen=True)
class Rollout:
    """What the switch observed of a rollout (`reconcile.switch`)."""

    digest: str
    """The plan being rolled out (`status.planHash`)."""
    serving_digest: str | None
    """The plan the endpoint routes to, if any."""
    target: Sequence[StageAvailability]
    """The target plan's stages."""
    serving: Sequence[StageAvailability] = ()
    """The served plan's stages (empty when it is the target or there is none)."""
    stalled: str | None = None
    """Set when the switch ran past its timeout (planning.replan.stalled_switch): the
    served plan keeps serving and the pipeline is Degraded with this message."""

    @property
    def switching(self) -> bool:
        return self.serving_digest is not None and self.serving_digest != self.digest

    @property
    def missing(self) -> list[StageAvailability]:
        return [a for a in self.target if not a.available]


Verdict = tuple[str, dict[str, Any], dict[str, Any]]
"""phase, the Ready condition, the Degraded condition."""


def _all_available(total: int, conds: Conditions) -> Verdict:
    """Every stage of the target serves: Ready, unless this generation could not plan."""
    ready = conds.of(READY, True, REASON_STAGES_AVAILABLE, f"all {total} stages available")
    unplanned = _unplanned_generation(conds)
    if unplanned is None:
        return "Ready", ready, conds.of(DEGRADED, False, REASON_AS_PLANNED, "running as planned")
    message = f"serving the previous plan: {unplanned.get('message', '')}"
    return "Degraded", ready, conds.of(DEGRADED, True, str(unplanned["reason"]), message)


def _switching(observed: Rollout, up: int, total: int, conds: Conditions) -> Verdict:
    """The served plan serves while the target comes up; Degraded once the switch stalls."""
    message = f"serving plan {observed.serving_digest} while plan {observed.digest} comes up"
    ready = conds.of(READY, True, REASON_SWITCHING, f"{message} ({up}/{total})")
    stalled = observed.stalled
    if stalled is None:
        return (
            "Deploying",
            ready,
            conds.of(DEGRADED, False, REASON_SWITCHING, "previous plan serving"),
        )
    return "Degraded", ready, conds.of(DEGRADED, True, REASON_SWITCH_TIMED_OUT, stalled)


def _waiting(observed: Rollout, up: int, total: int, conds: Conditions) -> Verdict:
    """Stages missing and nothing else serves: Deploying at first, Degraded once it was Ready."""
    was_ready = conds.was(READY, True)
    waiting = "; ".join(f"s{a.index}: {a.reason or 'not available'}" for a in observed.missing)
    reason = REASON_STAGE_UNAVAILABLE if was_ready else REASON_STAGES_PENDING
    ready = conds.of(READY, False, reason, f"{up}/{total} stages available; {waiting}")
    degraded = conds.of(DEGRADED, was_ready, reason, waiting if was_ready else "rolling out")
    return ("Degraded" if was_ready else "Deploying"), ready, degraded


def rollout(plan: Mapping[str, Any], observed: Rollout, conds: Conditions) -> dict[str, Any]:
    """Ready/Degraded/Deploying from the availability of the target and the served plan."""
    total = len(plan["stages"])
    up = sum(1 for a in observed.target if a.available)
    serving_ok = bool(observed.serving) and all(a.available for a in observed.serving)
    if not observed.missing and not observed.switching:
        phase, ready, degraded = _all_available(total, conds)
    elif observed.switching and serving_ok:
        phase, ready, degraded = _switching(observed, up, total, conds)
    else:
        phase, ready, degraded = _waiting(observed, up, total, conds)
    return {
        "phase": phase,
        "ready": f"{up}/{total}",
        "servingPlanHash": observed.serving_digest,
        "stageCount": total,
        "bottleneck": bottleneck_text(plan),
        "estimates": estimates(plan),
        "plan": plan_summary(plan, availability=observed.target),
        "conditions": conds.merged(ready, degraded),
    }


def measured(result: speed.Measured, plan: Mapping[str, Any], *, now: str) -> dict[str, Any]:
    """`status.measured`: what the running stages measured in the last window, next to the
    plan's estimate of each stage (`estimatedSeconds`, `ratio` = measured / estimated)."""
    planned = {int(s["index"]): s for s in plan["stages"]}
    stages = []
    for stage in result.stages:
        entry: dict[str, Any] = {
            "index": stage.index,
            "stepSeconds": round(stage.step_seconds, 6),
        }
        if stage.send_seconds is not None:
            entry["sendSeconds"] = round(stage.send_seconds, 6)
        estimate = planned.get(stage.index)
        if estimate is not None:
            entry["node"] = str(estimate["node"])
            estimated = float(estimate["computeSeconds"])
            entry["estimatedSeconds"] = round(estimated, 6)
            if estimated > 0:
                entry["ratio"] = round(stage.step_seconds / estimated, 3)
        stages.append(entry)
    slowest = result.bottleneck
    node = planned.get(slowest.index, {}).get("node", "?")
    report: dict[str, Any] = {
        "measuredAt": now,
        "windowSeconds": round(result.window_seconds, 1),
        "bottleneckStage": slowest.index,
        "bottleneck": f"{format_seconds(slowest.slowest)} s{slowest.index}@{node}",
        "stages": stages,
    }
    if result.tokens_per_second is not None:
        report["tokensPerSecond"] = round(result.tokens_per_second, 1)
    return report
