"""The switch's planner on tables of observed states (pure: object dicts shaped like the
API's, no cluster): when it waits, when it switches the endpoint Service, how long an
unrouted plan drains (`spec.replan.drainSeconds`, recorded in `status.drainingPlans`),
which plans it removes and in which order, and when its status report is worth writing.

Covers llmpipe_operator/rollout.py `next_step`; reconcile/switch.py only executes it.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

import pytest

from llmpipe_operator import rollout
from llmpipe_operator.manifests import endpoint, names, render
from tests.unit.manifests.builders import REF, a_plan, a_spec

NOW = datetime.datetime(2026, 12, 1, 12, 0, tzinfo=datetime.UTC)


def plan_objects(max_sequences: int) -> tuple[str, list[dict[str, Any]]]:
    """A plan's rendered objects (its digest differs with the workload)."""
    spec = a_spec().workload(maxSequences=max_sequences).build()
    plan = a_plan(spec)
    digest = names.plan_hash(plan, spec)
    return digest, render.render_plan(REF, spec, plan, digest=digest)


OLD, OLD_OBJECTS = plan_objects(4)
NEW, NEW_OBJECTS = plan_objects(8)
SPEC = a_spec().build()


def available(objects: list[dict[str, Any]], up: bool) -> list[dict[str, Any]]:
    """The plan's objects as the API returns them, each Deployment available or not."""
    result = json.loads(json.dumps(objects))
    for obj in result:
        if obj["kind"] == "Deployment":
            obj["metadata"]["generation"] = 1
            obj["status"] = {"observedGeneration": 1, "availableReplicas": 1 if up else 0}
    return result


def service_to(digest: str | None) -> list[dict[str, Any]]:
    if digest is None:
        return []
    return [endpoint.build_endpoint_service(REF, SPEC, serving_digest=digest)]


def routed(*digests: str) -> list[dict[str, Any]]:
    """EndpointSlices with a ready stage-0 pod of each plan behind the Service."""
    endpoints = [
        {"targetRef": {"name": f"{REF.name}-{d}-s0-5d9f-x2"}, "conditions": {"ready": True}}
        for d in digests
    ]
    return [{"endpoints": endpoints}]


def observe(
    *,
    target: str,
    children: list[dict[str, Any]],
    slices: Any = (),
    st: Any = None,
    replan_spec: Any = None,
    now: datetime.datetime = NOW,
) -> rollout.Observed:
    return rollout.Observed(
        ref=REF,
        target=target,
        generation=1,
        status=st if st is not None else {"planHash": target},
        replan_spec=replan_spec if replan_spec is not None else {"drainSeconds": 0},
        children=children,
        pods=[],
        slices=list(slices),
        now=now,
    )


def kinds(objects: tuple[Any, ...], digest: str) -> list[str]:
    return [o["kind"] for o in objects if rollout.digest_of(o) == digest]


# (name, target, children, slices) -> (switch to, came from, serving, removed plan, phase)
TABLE = [
    (
        "the target is not applied yet: wait",
        NEW,
        [*available(OLD_OBJECTS, True), *service_to(OLD)],
        routed(OLD),
        (None, None, None, None, None),
    ),
    (
        "a first plan coming up: no switch, nothing removed, Deploying",
        NEW,
        available(NEW_OBJECTS, False),
        (),
        (None, None, None, None, "Deploying"),
    ),
    (
        "a first plan fully available: the Service is created, no plan came before",
        NEW,
        available(NEW_OBJECTS, True),
        (),
        (NEW, None, NEW, None, "Ready"),
    ),
    (
        "a new plan coming up behind a serving one: the old one serves on",
        NEW,
        [*available(OLD_OBJECTS, True), *available(NEW_OBJECTS, False), *service_to(OLD)],
        routed(OLD),
        (None, None, OLD, None, "Deploying"),
    ),
    (
        "the new plan is available: switch; the old one stays while its endpoint is ready",
        NEW,
        [*available(OLD_OBJECTS, True), *available(NEW_OBJECTS, True), *service_to(OLD)],
        routed(OLD),
        (NEW, OLD, NEW, None, "Ready"),
    ),
    (
        "switched and the old endpoint is gone: remove the old plan",
        NEW,
        [*available(OLD_OBJECTS, True), *available(NEW_OBJECTS, True), *service_to(NEW)],
        routed(NEW),
        (None, None, NEW, OLD, "Ready"),
    ),
]


@pytest.mark.parametrize(
    ("target", "children", "slices", "expected"),
    [row[1:] for row in TABLE],
    ids=[row[0] for row in TABLE],
)
def test_next_step(target: str, children: list, slices: Any, expected: tuple) -> None:
    to, came_from, serving, removed, phase = expected
    action = rollout.next_step(observe(target=target, children=children, slices=slices))
    assert (action.switch.to if action.switch else None) == to
    assert (action.switch.came_from if action.switch else None) == came_from
    assert action.serving == serving
    assert (action.report["phase"] if action.report else None) == phase
    removed_plans = {rollout.digest_of(o) for o in action.remove}
    assert removed_plans == ({removed} if removed else set())
    if removed:
        # Deployments first, then Services, then the plan ConfigMap
        assert kinds(action.remove, removed) == sorted(
            kinds(action.remove, removed), key=rollout.DELETE_ORDER.__getitem__
        )
        assert kinds(action.remove, removed)[-1] == "ConfigMap"


def test_a_repeated_observation_gives_the_same_step_and_no_needless_write() -> None:
    children = [*available(NEW_OBJECTS, True), *service_to(NEW)]
    first = rollout.next_step(observe(target=NEW, children=children, slices=routed(NEW)))
    assert first.write_report and first.report is not None
    written = {"planHash": NEW, **first.report}
    again = rollout.next_step(
        observe(target=NEW, children=children, slices=routed(NEW), st=written)
    )
    assert again == rollout.Action(
        serving=NEW, switch=None, remove=(), report=again.report, write_report=False
    )
    assert again.report is not None and again.report["phase"] == "Ready"


SWITCHED = [*available(OLD_OBJECTS, True), *available(NEW_OBJECTS, True), *service_to(NEW)]


def test_an_unrouted_plan_drains_for_drain_seconds_then_is_removed() -> None:
    drain = {"drainSeconds": 120}
    first = rollout.next_step(
        observe(target=NEW, children=SWITCHED, slices=routed(NEW), replan_spec=drain)
    )
    assert first.remove == () and first.drained == ()
    assert first.drain_started == (OLD,)
    assert first.report is not None and first.report["drainingPlans"] == {
        OLD: "2026-12-01T12:00:00Z"
    }
    assert first.write_report
    written = {"planHash": NEW, **first.report}
    later = NOW + datetime.timedelta(seconds=119)
    still = rollout.next_step(
        observe(
            target=NEW,
            children=SWITCHED,
            slices=routed(NEW),
            st=written,
            replan_spec=drain,
            now=later,
        )
    )
    assert still.remove == () and still.drain_started == () and not still.write_report
    done = rollout.next_step(
        observe(
            target=NEW,
            children=SWITCHED,
            slices=routed(NEW),
            st=written,
            replan_spec=drain,
            now=NOW + datetime.timedelta(seconds=120),
        )
    )
    assert {rollout.digest_of(o) for o in done.remove} == {OLD}
    assert done.drained == (OLD,)
    assert done.report is not None and done.report["drainingPlans"] is None  # key removed
    assert done.write_report


def test_a_plan_still_routed_does_not_start_draining() -> None:
    action = rollout.next_step(
        observe(
            target=NEW,
            children=SWITCHED,
            slices=routed(OLD, NEW),
            replan_spec={"drainSeconds": 120},
        )
    )
    assert action.drain_started == () and action.remove == ()


def test_drain_seconds_defaults_to_a_typical_completion() -> None:
    from llmpipe_operator.planning import replan

    assert replan.ReplanSettings.from_spec(None).drain_seconds == 120
    assert replan.ReplanSettings.from_spec({"drainSeconds": 0}).drain_seconds == 0
    with pytest.raises(ValueError, match="drainSeconds must be >= 0"):
        replan.ReplanSettings.from_spec({"drainSeconds": -1})


def test_a_broken_unrouted_plan_is_removed_without_draining() -> None:
    children = [*available(OLD_OBJECTS, False), *available(NEW_OBJECTS, True), *service_to(NEW)]
    action = rollout.next_step(
        observe(
            target=NEW, children=children, slices=routed(NEW), replan_spec={"drainSeconds": 120}
        )
    )
    assert {rollout.digest_of(o) for o in action.remove} == {OLD}
    assert action.drain_started == () and action.drained == (OLD,)
