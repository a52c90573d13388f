"""Reconcile one LLMPipeline: observe nodes -> plan -> render -> apply -> report.

Called for a spec change (create, update, resume) and, by the re-planning code, for node
changes. The pieces are separate functions (`observe_nodes`, `make_plan`, `deploy_plan`)
so a caller can put its own decision between planning and deploying (re-planning's
hysteresis). Everything that touches a pipeline's objects runs under its lock.

A new plan never replaces a running one in place: its objects carry a new plan hash, and
`switch.advance` moves the user-facing Service only when they are all available.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from lightkube import AsyncClient

from llmpipe_operator import spec as spec_mod
from llmpipe_operator import status, telemetry
from llmpipe_operator.k8s import api, events
from llmpipe_operator.manifests import endpoint, names, network, render
from llmpipe_operator.planning import live, planner, speed
from llmpipe_operator.reconcile import capacity, certs, errors, fetch, locks, measure, switch

log = logging.getLogger(__name__)


class NoEligibleNodes(Exception):
    """No node passes the pipeline's placement filters (or none is Ready)."""


class NodesFull(Exception):
    """Nodes pass the filters, but others hold all of their memory (InsufficientMemory)."""


async def reconcile_pipeline(
    client: AsyncClient, *, namespace: str, name: str, memory_usage: Mapping[str, int] | None = None
) -> str | None:
    """Plan and deploy the pipeline as its spec says; returns the plan hash (None: no plan)."""
    key = (namespace, name)
    async with locks.pipeline_lock(namespace, name):
        pipeline = await fetch.fetch_pipeline(client, namespace=namespace, name=name)
        if pipeline is None:
            capacity.release(key)
            return None
        if pipeline.status.get("observedGeneration") != pipeline.generation:
            await report_phase(client, pipeline, "Planning")
        async with capacity.planning():  # one pipeline at a time claims free memory
            # 1. observe nodes (and the pods on them)
            observed = await observe_nodes(
                client,
                pipeline.spec,
                owner=key,
                memory_usage=memory_usage,
                time_factors=speed.parse_factors(pipeline.status.get("effectiveFactors")),
            )
            # 2. plan
            try:
                plan, digest, _ = await asyncio.to_thread(
                    plan_now, pipeline.spec, observed, rolled_out=pipeline.status.get("planHash")
                )
            except Unplanned as unplanned:
                capacity.release(key)
                failure: Unplanned | None = unplanned
            else:
                failure = None
                capacity.reserve(key, plan, digest=digest)
        if failure is not None:
            await report_infeasible(client, pipeline, failure.nodes, failure.error)
            return None
        # 3. render  4. apply  5. report
        try:
            digest = await deploy_plan(client, pipeline, plan)
        except errors.Forbidden as error:
            await report_forbidden(client, pipeline, error)
            raise
    await switch.advance(client, namespace=namespace, name=name)
    return digest


class NoRoomToSwitch(Exception):
    """A new plan exists, but not beside the running plan, which serves until the switch."""


INFEASIBLE = (planner.PlanInfeasible, NoEligibleNodes, NodesFull)
"""What make_plan raises when no plan can be made now."""


class Unplanned(Exception):
    """No plan now: `error` says why (one of INFEASIBLE or NoRoomToSwitch), `nodes` what
    the planner saw; report_infeasible reports it."""

    def __init__(self, error: Exception, nodes: live.LiveInventory) -> None:
        super().__init__(str(error))
        self.error, self.nodes = error, nodes


@dataclasses.dataclass(frozen=True)
class Observed:
    """Nodes and pods as listed once, under `capacity.planning()`."""

    raw_nodes: Sequence[Mapping[str, Any]]
    pods: Sequence[Mapping[str, Any]]
    owner: live.PipelineKey
    eligibility: live.Eligibility
    memory_usage: Mapping[str, int]
    reservations: Mapping[live.PipelineKey, live.Reservation]
    time_factors: Mapping[str, float] = dataclasses.field(default_factory=dict)
    """The pipeline's measured node time factors (`status.effectiveFactors`)."""

    def inventory(self, *, beside: str | None = None) -> live.LiveInventory:
        """The eligible nodes, each with the memory others leave free: allocatable minus
        the larger of what the pods there request (all but the owner's own -- or, with
        `beside`, all but the owner's pods of that plan -- plus other pipelines' reserved
        stages not yet created; see `capacity`) and `memory_usage`."""
        holdings = live.held_memory(
            self.pods, pipeline=self.owner, reservations=self.reservations, beside=beside
        )
        usage = dict(self.memory_usage)
        for node, held in holdings.total.items():
            usage[node] = max(usage.get(node, 0), held)
        nodes = live.build_inventory(
            self.raw_nodes,
            eligibility=self.eligibility,
            memory_usage=usage,
            gpus_held=holdings.gpus,
            time_factors=self.time_factors,
        )
        return dataclasses.replace(nodes, holdings=holdings)

    def own_plans(self) -> frozenset[str]:
        return live.own_plans(self.pods, pipeline=self.owner)


async def observe_nodes(
    client: AsyncClient,
    spec: spec_mod.PipelineSpec,
    *,
    owner: live.PipelineKey,
    memory_usage: Mapping[str, int] | None = None,
    time_factors: Mapping[str, float] | None = None,
) -> Observed:
    """Nodes, pods and reservations for planning `owner` with `spec`. `memory_usage` is
    bytes in use by others per node (metrics.k8s.io via `k8s.metrics_api`) when the caller
    has it. Call under `capacity.planning()`."""
    async with errors.classified("list nodes and pods"):
        raw_nodes = await api.list_nodes(client)
        pods = await api.list_all_pods(client)
    eligibility = spec.placement.eligibility()
    observed = Observed(
        raw_nodes=raw_nodes,
        pods=pods,
        owner=owner,
        eligibility=eligibility,
        memory_usage=dict(memory_usage or {}),
        reservations=capacity.reservations(),
        time_factors=dict(time_factors or {}),
    )
    for note in observed.inventory().notes:
        log.warning("%s", note)  # e.g. a malformed llmpipe.io/links annotation: links ignored
    return observed


def plan_now(  # pure and CPU-bound: callers run it in a thread, off the event loop
    spec: spec_mod.PipelineSpec,
    observed: Observed,
    *,
    rolled_out: str | None,
    discard_running: bool = False,
) -> tuple[dict[str, Any], str, live.LiveInventory]:
    """(plan, its hash, the inventory it was made on); raises Unplanned.

    The pipeline's own stages are counted once. First the plan is made on the memory they
    hold now (as if they were gone): if that is the plan already rolled out, or the
    pipeline has no pods of another plan, that is it. Otherwise the new stages will come
    up next to the running ones (which serve until the switch), so it is planned again
    with the running stages counted as held: the plan that fits beside them, or
    NoRoomToSwitch (the running plan keeps serving). A later re-plan, once the old stages
    are gone, may move to the plan the freed memory allows. `discard_running`: the
    running plan cannot serve (a stage's node is gone), so its stages make room instead
    (the caller removes them before deploying).
    """
    nodes = observed.inventory()
    try:
        plan = make_plan(spec, nodes)
    except INFEASIBLE as error:
        raise Unplanned(error, nodes) from error
    digest = names.plan_hash(plan, spec)
    if discard_running or digest == rolled_out or not observed.own_plans() - {digest}:
        return plan, digest, nodes
    beside = observed.inventory(beside=digest)
    try:
        plan = make_plan(spec, beside)
    except INFEASIBLE as error:
        refusal = NoRoomToSwitch(f"no new plan fits beside the running one: {error}")
        raise Unplanned(refusal, beside) from error
    return plan, names.plan_hash(plan, spec), beside


def make_plan(spec: spec_mod.PipelineSpec, nodes: live.LiveInventory) -> dict[str, Any]:
    """The plan JSON of docs/design.md for this spec on these nodes; raises planner.PlanInfeasible
    (naming the memory shortfall), NodesFull or NoEligibleNodes."""
    if not nodes.inventory.nodes and nodes.full:
        raise NodesFull(f"others hold all the memory of the {len(nodes.full)} matching node(s)")
    if not nodes.inventory.nodes:
        raise NoEligibleNodes(
            "no eligible node: none is Ready, schedulable, tolerated and matching spec.placement"
        )
    workload = workload_of(spec)
    placement = planner.Placement(
        first_stage=spec.placement.first_stage,
        last_stage=spec.placement.last_stage,
        max_stages=spec.placement.max_stages,
    )
    with telemetry.timed_plan():
        try:
            plan = planner.plan_pipeline(
                spec.profile(), nodes.inventory, workload=workload, placement=placement
            )
        except planner.PlanInfeasible:
            telemetry.plan_computed(feasible=False)
            raise
    telemetry.plan_computed(feasible=True)
    made = dict(plan.to_dict())
    for stage in made["stages"]:
        # The factor a stage's estimate already includes: the reader measures the node's
        # factor as this times measured / estimated (no factor: the plan is unchanged).
        if stage["node"] in nodes.time_factors:
            stage[speed.FACTOR] = nodes.time_factors[stage["node"]]
    return made


def workload_of(spec: spec_mod.PipelineSpec) -> planner.Workload:
    """The planner's workload, stage 0 holding the draft model when spec.model.draft names one."""
    workload = planner.Workload(
        objective=spec.workload.objective,
        max_sequences=spec.workload.max_sequences,
        max_context_tokens=spec.workload.max_context_tokens,
        runtime_overhead_bytes=spec.runtime.runtime_overhead_bytes,
        device=spec.runtime.device,
        dtype=spec.model.dtype,
    )
    return planner.with_draft(workload, spec.draft_profile())


async def deploy_plan(
    client: AsyncClient, pipeline: fetch.Pipeline, plan: Mapping[str, Any]
) -> str:
    """Steps 3-5 for a feasible plan: render, apply, report. Call under the pipeline's lock.

    The plan's objects are applied next to whatever serves now; only the first plan of a
    pipeline gets the user-facing Service right away (nothing else could serve).
    """
    ref, spec = pipeline.ref, pipeline.spec
    digest = names.plan_hash(plan, spec)
    # 3. render
    objects = render.render_plan(ref, spec, plan, digest=digest)
    # 4. apply
    async with errors.classified("apply the plan's objects"):
        current = await api.get_service(
            client, namespace=ref.namespace, name=names.endpoint_service_name(ref)
        )
        serving = endpoint.serving_digest(current) or digest
        # The plan ConfigMap first: it owns the stage certificates, which must exist
        # before the Deployments (their pods mount them).
        plan_objects = [o for o in objects if o["kind"] == "ConfigMap"]
        # The NetworkPolicy with it: no stage pod runs a moment without it.
        await api.apply_objects(
            client,
            [
                network.build_network_policy(
                    ref, spec, operator_namespace=measure.configured().operator_namespace
                ),
                *plan_objects,
            ],
        )
    await certs.ensure_stage_certificates(
        client, ref, digest=digest, stage_count=len(plan["stages"])
    )
    async with errors.classified("apply the plan's objects"):
        await api.apply_objects(client, [o for o in objects if o["kind"] != "ConfigMap"])
        await api.apply_objects(
            client, [endpoint.build_endpoint_service(ref, spec, serving_digest=serving)]
        )
    # 5. report
    new = pipeline.status.get("planHash") != digest
    patch = status.planned(
        plan,
        digest=digest,
        generation=pipeline.generation,
        now=fetch.now(),
        endpoint=names.endpoint_url(ref, spec.service.port),
        previous=pipeline.conditions,
    )
    if new:
        patch["phase"] = "Deploying"
        patch["rolloutStarted"] = fetch.now()
    async with errors.classified("report the plan"):
        await api.patch_status(client, namespace=ref.namespace, name=ref.name, status=patch)
    if new:
        async with errors.classified("post the Planned Event"):
            await events.post(
                client,
                pipeline.body,
                type="Normal",
                reason="Planned",
                message=status.truncate(f"plan {digest}: {status.describe_plan(plan)}"),
            )
    return digest


async def report_forbidden(
    client: AsyncClient, pipeline: fetch.Pipeline, error: errors.Forbidden
) -> None:
    """Say on the pipeline why nothing is deployed when the operator may not write in its
    namespace (the cluster-wide watch sees pipelines where no RoleBinding grants writes)."""
    ref = pipeline.ref
    message = (
        f"the operator may not write in namespace {ref.namespace}: {error}; a cluster admin "
        "grants it with a RoleBinding to the chart's <release>-workloads ClusterRole "
        "(the chart's NOTES print the command)"
    )
    patch = status.forbidden(
        message, generation=pipeline.generation, now=fetch.now(), previous=pipeline.conditions
    )
    async with errors.classified("report the forbidden write"):
        await api.patch_status(client, namespace=ref.namespace, name=ref.name, status=patch)
    if not any(c.get("message") == message for c in pipeline.conditions):
        async with errors.classified("post the Forbidden Event"):
            await events.post(
                client,
                pipeline.body,
                type="Warning",
                reason=status.REASON_FORBIDDEN,
                message=message,
            )


async def report_phase(client: AsyncClient, pipeline: fetch.Pipeline, phase: str) -> None:
    async with errors.classified("report the phase"):
        await api.patch_status(
            client,
            namespace=pipeline.ref.namespace,
            name=pipeline.ref.name,
            status={"phase": phase},
        )


async def report_infeasible(
    client: AsyncClient, pipeline: fetch.Pipeline, nodes: live.LiveInventory, error: Exception
) -> None:
    """Planned=False naming the shortfall; a plan that is not serving is removed (no
    half-deployed pipeline), one that serves keeps serving. Call under the lock."""
    ref = pipeline.ref
    message = str(error)
    held = nodes.held_on_candidates()
    if held and not isinstance(error, NoEligibleNodes):
        message = f"{message}; memory held by others: {held}"
    if nodes.excluded:
        left_out = ", ".join(f"{n} ({why})" for n, why in sorted(nodes.excluded.items()))
        message = f"{message}; nodes not eligible: {left_out}"
    async with errors.classified("remove the unfinished plan"):
        serving = await switch.remove_unserved(client, ref)
    if isinstance(error, NoEligibleNodes):
        patch = status.no_nodes(
            message,
            generation=pipeline.generation,
            now=fetch.now(),
            serving=serving is not None,
            previous=pipeline.conditions,
        )
    else:
        patch = status.infeasible(
            message,
            generation=pipeline.generation,
            now=fetch.now(),
            serving=serving is not None,
            previous=pipeline.conditions,
        )
    if serving is not None:
        patch["planHash"] = serving  # a plan that was still coming up is gone
    else:
        patch.update(status.no_plan_fields())
    async with errors.classified("report the infeasible plan"):
        await api.patch_status(client, namespace=ref.namespace, name=ref.name, status=patch)
    telemetry.set_phase(ref.namespace, ref.name, str(patch["phase"]))
    async with errors.classified("post the infeasible plan Event"):
        await events.post(
            client,
            pipeline.body,
            type="Warning",
            reason=str(patch["conditions"][0]["reason"]),
            message=status.truncate(message),
        )
