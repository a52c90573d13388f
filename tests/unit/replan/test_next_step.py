"""The switch's planner on tables of observed states (pure: object dicts shaped like the
API's, no cluster): when it waits, when it switches the endpoint Service, which plans it
removes and in which order, and when its status report is worth writing.

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
    *, target: str, children: list[dict[str, Any]], slices: Any = (), st: Any = None
) -> rollout.Observed:
    return rollout.Observed(
        ref=REF,
        target=target,
        generation=1,
        status=st if st is not None else {"planHash": target},
        replan_spec=None,
        children=children,
        pods=[],
        slices=list(slices),
        now=NOW,
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
