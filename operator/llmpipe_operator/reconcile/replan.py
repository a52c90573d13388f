"""Node-change driven re-planning: from a node event to a new plan serving, or a reason not to.

One `Replanner` per operator process (kept in Kopf's memo). Kopf handlers feed it and
return at once: every Node event (`node_event`) and every LLMPipeline event
(`pipeline_event`, so that routing a node change needs no API call). Its `run()` task,
owned by the operator (started at startup, cancelled at cleanup), wakes when a burst of
changes is due and re-plans the pipelines it affects; no handler ever sleeps.

A re-plan, as numbered steps (`replan_pipeline`):
  1. observe the pipeline, its running plan and the eligible nodes (with metrics.k8s.io
     memory usage by others, when served);
  2. plan from scratch on today's nodes;
  3. decide (planning.replan.decide_switch): a broken running plan is always replaced, a
     feasible one only for the improvement margin;
  4. deploy the new plan next to the old one (reconcile.pipeline.deploy_plan); the
     zero-downtime switch itself is reconcile.switch.advance's;
  5. report: status.replan, an Event with the cause, the re-plan metric.

The switch timeout (planning.replan.stalled_switch, applied by switch.advance): a new plan
not available within `spec.replan.switchTimeoutSeconds` leaves the old plan serving and the
pipeline Degraded; `check_switch_deadlines` makes sure that is reported when the time is up.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import kopf
from lightkube import AsyncClient

from llmpipe_operator import rollout, status, telemetry
from llmpipe_operator import spec as spec_mod
from llmpipe_operator.k8s import api, events, metrics_api
from llmpipe_operator.planning import live, replan, speed
from llmpipe_operator.reconcile import capacity, errors, fetch, locks, pipeline, switch

log = logging.getLogger(__name__)

Key = tuple[str, str]
"""(namespace, name) of an LLMPipeline."""

RETRY_SECONDS = 5.0
"""A re-plan that failed on the API (conflict, restarting server) is tried again this much
later, with the same changes: nothing is lost, and a broken API is not hammered."""

IDLE_CHECK_SECONDS = 5.0
"""How often the loop looks at switch deadlines when no node change wakes it."""
SAFETY_NET_SECONDS = 30.0
"""How often every pipeline's switch is pushed one step even without an event. Events are
the trigger; this only catches what a dropped watch missed. It runs here rather than as a
Kopf timer because Kopf timers always put a finalizer on the resource, and a finalizer makes
deleting a pipeline wait on a running operator."""


@dataclasses.dataclass
class Tracked:
    """What the re-planner knows about one pipeline between events."""

    eligibility: live.Eligibility
    planned: frozenset[str]
    settings: replan.ReplanSettings
    debouncer: replan.Debouncer
    body: Mapping[str, Any]
    not_before: float = 0.0
    """Monotonic time before which a failed re-plan is not retried."""
    stall_reported: str | None = None
    """Plan hash whose stalled switch was already reported (one Event per stall)."""


class Replanner:
    """Routes node changes to the pipelines they affect and re-plans them when due."""

    def __init__(
        self,
        client: AsyncClient,
        *,
        usage: metrics_api.NodeUsagePoller | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.usage = usage
        self.clock = clock
        self.nodes: dict[str, Mapping[str, Any]] = {}
        self.pipelines: dict[Key, Tracked] = {}
        self._wake = asyncio.Event()
        self._joining: set[str] = set()
        """Nodes added but not yet Ready."""
        self._next_sweep = clock() + SAFETY_NET_SECONDS

    # --- feeding (called from Kopf handlers; cheap, never blocks) -------------------------

    def pipeline_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """Remember a pipeline's placement, planned nodes and settings; forget a deleted one."""
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace")), str(meta.get("name")))
        if event_type == "DELETED":
            self.pipelines.pop(key, None)
            return
        raw_spec = body.get("spec") or {}
        try:
            parsed = spec_mod.parse_spec(raw_spec)
            settings = replan.ReplanSettings.from_spec(raw_spec.get("replan"))
        except (spec_mod.SpecError, ValueError) as error:
            # The spec handler reports an invalid spec on the resource; nothing to re-plan.
            log.debug("not tracking %s/%s for re-planning: %s", *key, error)
            self.pipelines.pop(key, None)
            return
        tracked = self.pipelines.get(key)
        eligibility = parsed.placement.eligibility()
        planned = planned_nodes(body)
        if tracked is None:
            debouncer = replan.Debouncer(settings.debounce_seconds)
            self.pipelines[key] = Tracked(eligibility, planned, settings, debouncer, body)
            return
        observe_switch(tracked.body, body)
        tracked.eligibility, tracked.planned, tracked.body = eligibility, planned, body
        tracked.settings = settings
        tracked.debouncer.window_seconds = settings.debounce_seconds
        # The node watch and the pipeline watch are separate streams: a node removal can
        # arrive before the status that put a stage on that node. Re-judge what is pending.
        if any(replan.is_urgent(c, planned) for c in tracked.debouncer.pending):
            tracked.debouncer.make_urgent()
            self._wake.set()

    def measured_drift(self, key: Key, factors: Mapping[str, float]) -> None:
        """The stage-metrics reader recorded node time factors for one pipeline: re-plan it
        (debounced, then the hysteresis), with the factors the status now holds."""
        tracked = self.pipelines.get(key)
        if tracked is None:
            return
        now = self.clock()
        for node, factor in sorted(factors.items()):
            text = f"node {node} measured at {factor:g}x its estimated step time"
            change = replan.NodeChange(node=node, kind=replan.ChangeKind.MEASURED, text=text)
            tracked.debouncer.add(change, now=now)
            log.info("%s: queued for %s/%s", text, *key)
        self._wake.set()

    def node_event(self, event_type: str | None, body: Mapping[str, Any]) -> list[Key]:
        """Classify a Node event and queue it for the pipelines it affects (returned)."""
        name = str((body.get("metadata") or {}).get("name", ""))
        old = self.nodes.get(name)
        new = None if event_type == "DELETED" else dict(body)
        if new is None:
            self.nodes.pop(name, None)
        else:
            self.nodes[name] = new
        if old is None and event_type is None:
            return []  # the initial listing (or a re-list) introduces a node, it did not join
        change = replan.classify_change(
            None if old is None else replan.node_state(old),
            None if new is None else replan.node_state(new),
        )
        if change is None:
            return []
        change = self._joining_node(change, new)
        affected = self._route(change, old, new)
        if affected:
            self._wake.set()
        return affected

    def _joining_node(
        self, change: replan.NodeChange, new: Mapping[str, Any] | None
    ) -> replan.NodeChange:
        """A node registers NotReady and with start-up taints, and turns usable moments
        later: report the change that makes it usable as "added", as a user thinks of it."""
        if change.kind is replan.ChangeKind.ADDED:
            if new is not None and not _settled(new):
                self._joining.add(change.node)
            return change
        if new is None or change.node not in self._joining:
            self._joining.discard(change.node)
            return change
        if _settled(new):
            self._joining.discard(change.node)
        return dataclasses.replace(
            replan.joined(change.node), kinds=change.all_kinds, label_keys=change.label_keys
        )

    def _route(
        self,
        change: replan.NodeChange,
        old: Mapping[str, Any] | None,
        new: Mapping[str, Any] | None,
    ) -> list[Key]:
        now, affected = self.clock(), []
        for key, tracked in self.pipelines.items():
            relevant = replan.is_relevant(
                change,
                planned_nodes=tracked.planned,
                eligible_before=is_eligible(old, tracked.eligibility),
                eligible_after=is_eligible(new, tracked.eligibility),
            )
            if relevant:
                urgent = replan.is_urgent(change, tracked.planned)
                tracked.debouncer.add(change, now=now, urgent=urgent)
                affected.append(key)
                log.info(
                    "%s: queued for %s/%s (%s)",
                    change.text,
                    *key,
                    "at once" if urgent else f"within {tracked.debouncer.window_seconds:g}s",
                )
        return affected

    # --- the loop (a task owned by the operator) -----------------------------------------

    async def run(self) -> None:
        """Re-plan bursts as they fall due, and watch switch deadlines, until cancelled."""
        while True:
            await self._sleep_until_due()
            await self.replan_due()
            await self.check_switch_deadlines()
            await self.advance_switches()

    async def _sleep_until_due(self) -> None:
        now = self.clock()
        due = [
            max(at, t.not_before)
            for t in self.pipelines.values()
            if (at := t.debouncer.due_at()) is not None
        ]
        timeout = min([IDLE_CHECK_SECONDS, *(max(0.0, at - now) for at in due)])
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=timeout)

    async def replan_due(self) -> list[Key]:
        """Re-plan every pipeline whose burst is due; returns their keys."""
        now = self.clock()
        due = [
            key for key, t in self.pipelines.items() if t.debouncer.due(now) and now >= t.not_before
        ]
        await asyncio.gather(*(self._replan_tracked(key) for key in due))
        return due

    async def _replan_tracked(self, key: Key) -> None:
        tracked = self.pipelines.get(key)
        if tracked is None:
            return
        changes = tracked.debouncer.take()
        try:
            await replan_pipeline(
                self.client, namespace=key[0], name=key[1], changes=changes, usage=self.node_usage()
            )
        except kopf.PermanentError as error:
            log.warning("re-plan of %s/%s dropped: %s", *key, error)
        except kopf.TemporaryError as error:
            log.warning(
                "re-plan of %s/%s failed, retrying in %.0fs: %s", *key, RETRY_SECONDS, error
            )
            for change in changes:  # keep them: the next attempt still needs to know why
                tracked.debouncer.add(change, now=self.clock(), urgent=True)
            tracked.not_before = self.clock() + RETRY_SECONDS

    def node_usage(self) -> metrics_api.NodeUsage:
        return metrics_api.NOT_POLLED if self.usage is None else self.usage.latest

    def memory_usage_for(self, namespace: str, name: str) -> dict[str, int] | None:
        """Memory in use per node by everything but this pipeline's own stages (as its
        status.plan gives them), for a spec-driven plan; None without metrics.k8s.io."""
        usage = self.node_usage()
        if not usage.served:
            return None
        tracked = self.pipelines.get((namespace, name))
        plan = ((tracked.body.get("status") or {}).get("plan") if tracked else None) or {}
        return others_usage(usage, own_stage_memory(plan))

    async def advance_switches(self) -> None:
        """Every SAFETY_NET_SECONDS, push each tracked pipeline's switch one step."""
        now = self.clock()
        if now < self._next_sweep:
            return
        self._next_sweep = now + SAFETY_NET_SECONDS
        for namespace, name in list(self.pipelines):
            try:
                await switch.advance(self.client, namespace=namespace, name=name)
            except (kopf.TemporaryError, kopf.PermanentError) as error:
                # The next event or sweep tries again; the loop itself must keep running.
                log.warning("advancing the switch of %s/%s failed: %s", namespace, name, error)

    async def check_switch_deadlines(self) -> None:
        """Let `switch.advance` report a switch that ran past its timeout (once per plan)."""
        now = utcnow()
        for key, tracked in list(self.pipelines.items()):
            st = tracked.body.get("status") or {}
            replan_spec = (tracked.body.get("spec") or {}).get("replan")
            target = st.get("planHash")
            if target == tracked.stall_reported or not replan.switch_overdue(
                st, replan_spec, now=now
            ):
                continue
            tracked.stall_reported = target
            await report_stall(self.client, namespace=key[0], name=key[1])


# --- one re-plan ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What a re-plan did, for the caller (and tests)."""

    outcome: str
    """switched | kept | unchanged | infeasible"""
    cause: str
    decision: str
    digest: str | None = None


async def replan_pipeline(
    client: AsyncClient,
    *,
    namespace: str,
    name: str,
    changes: Sequence[replan.NodeChange],
    usage: metrics_api.NodeUsage = metrics_api.NOT_POLLED,
) -> Outcome | None:
    """Re-plan one pipeline after node changes; None when the pipeline is gone."""
    async with locks.pipeline_lock(namespace, name):
        # 1. observe
        current_pipeline = await fetch.fetch_pipeline(client, namespace=namespace, name=name)
        if current_pipeline is None:
            capacity.release((namespace, name))
            return None
        settings = replan.ReplanSettings.from_spec(
            (current_pipeline.body.get("spec") or {}).get("replan")
        )
        current = await running_plan(client, current_pipeline)
        own = own_stage_memory(current)
        memory_usage = others_usage(usage, own) if usage.served else None
        key = (namespace, name)
        async with capacity.planning():  # one pipeline at a time claims free memory
            observed = await pipeline.observe_nodes(
                client,
                current_pipeline.spec,
                owner=key,
                memory_usage=memory_usage,
                time_factors=speed.parse_factors(current_pipeline.status.get("effectiveFactors")),
            )
            lost = lost_nodes(current, observed.raw_nodes)
            # 2. plan
            try:
                candidate, planned, _ = await asyncio.to_thread(
                    pipeline.plan_now,
                    current_pipeline.spec,
                    observed,
                    rolled_out=current_pipeline.status.get("planHash"),
                    discard_running=bool(lost),
                )
            except pipeline.Unplanned as unplanned:
                capacity.release(key)
                failure: pipeline.Unplanned | None = unplanned
            else:
                failure = None
                # 3. decide
                decision = decide(current_pipeline.spec, current, candidate, observed, settings)
                if decision.switch:
                    capacity.reserve(key, candidate, digest=planned)
        if failure is not None:
            outcome = Outcome(
                "infeasible",
                f"{replan.summarize_changes(changes)}: {failure.error}",
                str(failure.error),
            )
            await pipeline.report_infeasible(client, current_pipeline, failure.nodes, failure.error)
            await record(client, current_pipeline, outcome, changes=changes, usage=usage)
            return outcome
        # 4. deploy (the switch proper is switch.advance's, below, outside the lock)
        digest = None
        if decision.switch:
            if lost:  # the running ring is broken: its stages give their memory to the new plan
                await switch.remove_running(client, current_pipeline.ref, keep=planned)
            digest = await pipeline.deploy_plan(client, current_pipeline, candidate)
        kind = outcome_kind(decision, current, candidate)
        cause = replan.describe(changes, current, candidate)
        outcome = Outcome(kind, cause, decision.reason, digest)
        # 5. report
        await record(client, current_pipeline, outcome, changes=changes, usage=usage)
    if decision.switch:
        await switch.advance(client, namespace=namespace, name=name)
    return outcome


def decide(
    spec: spec_mod.PipelineSpec,
    current: Mapping[str, Any] | None,
    candidate: Mapping[str, Any],
    observed: pipeline.Observed,
    settings: replan.ReplanSettings,
) -> replan.SwitchDecision:
    """Switch to the candidate? Also when the running plan no longer fits what its own
    stages hold; compared with the running plan re-costed on today's facts (a node measured
    slower makes it worse too), not the figure recorded when it was deployed."""
    own_room = observed.inventory()
    available = {n.name: n.memory_bytes for n in own_room.inventory.nodes}
    problems = replan.plan_problems(current, available) if current else []
    now = (
        replan.reevaluate(current, spec.profile(), own_room.inventory, pipeline.workload_of(spec))
        if current and not problems
        else None
    )
    return replan.decide_switch(
        current,
        candidate,
        problems=problems,
        margin=settings.improvement_margin,
        current_objective=now,
    )


def outcome_kind(
    decision: replan.SwitchDecision,
    current: Mapping[str, Any] | None,
    candidate: Mapping[str, Any],
) -> str:
    if decision.switch:
        return "switched"
    unchanged = current and replan.layout(current) == replan.layout(candidate)
    return "unchanged" if unchanged else "kept"


async def running_plan(client: AsyncClient, current: fetch.Pipeline) -> dict[str, Any] | None:
    """The plan JSON of the plan being served or rolled out (`status.planHash`)."""
    digest = current.status.get("planHash")
    if not digest:
        return None
    async with errors.classified("read the running plan"):
        children = await api.list_children(
            client, namespace=current.ref.namespace, pipeline=current.ref.name, kinds=("ConfigMap",)
        )
    return rollout.plan_of(children, digest)


def lost_nodes(plan: Mapping[str, Any] | None, raw_nodes: Sequence[Mapping[str, Any]]) -> list[str]:
    """Nodes of the running plan that are gone or not Ready: its ring cannot serve."""
    ready = {str((n.get("metadata") or {}).get("name")) for n in raw_nodes if live.is_ready(n)}
    stages = (plan or {}).get("stages") or []
    return sorted({str(s["node"]) for s in stages} - ready)


def own_stage_memory(plan: Mapping[str, Any] | None) -> dict[str, int]:
    """Bytes the running plan gives its stages, per node (plan JSON or status.plan)."""
    own: dict[str, int] = {}
    for stage in (plan or {}).get("stages") or []:
        node = str(stage["node"])
        own[node] = own.get(node, 0) + int(stage.get("memoryBytes") or 0)
    return own


def others_usage(usage: metrics_api.NodeUsage, own: Mapping[str, int]) -> dict[str, int]:
    """Memory in use by everything but this pipeline's stages (see live.usable_memory)."""
    return {
        node: live.others_use(used, own.get(node, 0)) for node, used in usage.memory_bytes.items()
    }


async def record(
    client: AsyncClient,
    current: fetch.Pipeline,
    outcome: Outcome,
    *,
    changes: Sequence[replan.NodeChange],
    usage: metrics_api.NodeUsage,
) -> None:
    """status.replan, an Event on the pipeline, and the re-plan metric."""
    previous = current.status.get("replan") or {}
    patch = {
        "replan": {
            "count": int(previous.get("count") or 0) + 1,
            "lastTime": fetch.now(),
            "lastCause": outcome.cause,
            "lastDecision": f"{outcome.outcome}: {outcome.decision}",
            "nodeMetrics": usage.note,
        }
    }
    async with errors.classified("report the re-plan"):
        await api.patch_status(
            client, namespace=current.ref.namespace, name=current.ref.name, status=patch
        )
    reason, kind = EVENT_REASONS[outcome.outcome]
    message = (
        outcome.cause if outcome.outcome == "switched" else f"{outcome.cause} ({outcome.decision})"
    )
    async with errors.classified("post the re-plan Event"):
        await events.post(
            client, current.body, type=kind, reason=reason, message=status.truncate(message)
        )
    cause = replan.primary_kind(changes)
    telemetry.replanned(cause=cause.value if cause else "unknown", outcome=outcome.outcome)
    log.info(
        "%s/%s re-planned (%s): %s",
        current.ref.namespace,
        current.ref.name,
        outcome.outcome,
        message,
    )


EVENT_REASONS = {
    "switched": ("Replanned", "Normal"),
    "kept": ("ReplanSkipped", "Normal"),
    "unchanged": ("ReplanSkipped", "Normal"),
    "infeasible": ("ReplanInfeasible", "Warning"),
}


async def report_stall(client: AsyncClient, *, namespace: str, name: str) -> None:
    """Let switch.advance mark the overdue switch Degraded, then say so in an Event."""
    await switch.advance(client, namespace=namespace, name=name)
    async with errors.classified("read the LLMPipeline"):
        body = await api.get_pipeline(client, namespace=namespace, name=name)
    if body is None:
        return
    degraded = next(
        (
            c
            for c in (body.get("status") or {}).get("conditions") or []
            if c.get("type") == status.DEGRADED
            and c.get("reason") == status.REASON_SWITCH_TIMED_OUT
        ),
        None,
    )
    if degraded is not None:
        async with errors.classified("post the SwitchTimedOut Event"):
            await events.post(
                client,
                body,
                type="Warning",
                reason=status.REASON_SWITCH_TIMED_OUT,
                message=status.truncate(str(degraded.get("message"))),
            )
        telemetry.replanned(cause="switch-timeout", outcome="timed-out")


# --- small helpers ---------------------------------------------------------------------------


def is_eligible(node: Mapping[str, Any] | None, eligibility: live.Eligibility) -> bool:
    return node is not None and live.ineligibility(node, eligibility) is None


def planned_nodes(body: Mapping[str, Any]) -> frozenset[str]:
    stages = ((body.get("status") or {}).get("plan") or {}).get("stages") or []
    return frozenset(str(s["node"]) for s in stages if s.get("node"))


def observe_switch(before: Mapping[str, Any], after: Mapping[str, Any]) -> None:
    """Time a completed switch (rollout start -> the Service routes to the new plan)."""
    old, new = before.get("status") or {}, after.get("status") or {}
    serving = new.get("servingPlanHash")
    if not serving or serving == old.get("servingPlanHash") or serving != new.get("planHash"):
        return
    started = _parse_time(new.get("rolloutStarted"))
    if started is not None and old.get("servingPlanHash"):
        telemetry.SWITCH_DURATION.observe(max(0.0, (utcnow() - started).total_seconds()))


def _parse_time(value: Any) -> datetime.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _settled(node: Mapping[str, Any]) -> bool:
    """Ready and without the taints Kubernetes puts on a node that is starting up."""
    taints = (node.get("spec") or {}).get("taints") or []
    starting = any(str(t.get("key", "")).startswith("node.kubernetes.io/") for t in taints)
    return live.is_ready(node) and not starting


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
