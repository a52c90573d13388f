"""What the switch reads from observed objects: plan per hash, stage availability with the
reason a stage is not up, and which plans the endpoint's EndpointSlices still route to.

Covers the pure helpers of llmpipe_operator/rollout.py on object dicts shaped like the API's.
"""

from __future__ import annotations

import json

from llmpipe_operator import rollout
from llmpipe_operator.manifests import names, render
from tests.unit.manifests.builders import REF, a_plan, a_spec


def rendered() -> tuple[dict, str, list[dict]]:
    spec = a_spec().build()
    plan = a_plan(spec)
    digest = names.plan_hash(plan, spec)
    return plan, digest, render.render_plan(REF, spec, plan, digest=digest)


def with_status(obj: dict, **status: object) -> dict:
    obj = json.loads(json.dumps(obj))
    obj["metadata"]["generation"] = 1
    obj["status"] = {"observedGeneration": 1, **status}
    return obj


def test_plan_of_reads_the_hash_s_configmap() -> None:
    plan, digest, objects = rendered()
    assert rollout.plan_of(objects, digest) == plan
    assert rollout.plan_of(objects, "00000000") is None


def test_availability_per_stage_with_the_reason_from_the_pod() -> None:
    plan, digest, objects = rendered()
    deployments = [o for o in objects if o["kind"] == "Deployment"]
    children = [
        with_status(deployments[0], availableReplicas=1),
        *[with_status(d) for d in deployments[1:]],
    ]
    pending_pod = {
        "metadata": {"labels": names.stage_selector(REF, digest, 1)},
        "status": {
            "phase": "Pending",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/3 nodes are available",
                }
            ],
        },
    }
    result = rollout.availability(children, [pending_pod], digest=digest, plan=plan)
    assert [a.available for a in result] == [True] + [False] * (len(plan["stages"]) - 1)
    assert result[1].reason == "Unschedulable: 0/3 nodes are available"
    stale = with_status(deployments[0], availableReplicas=1)
    stale["metadata"]["generation"] = 2  # the controller has not seen the latest spec
    assert not rollout.availability([stale], [], digest=digest, plan=plan)[0].available
    assert rollout.availability([], [], digest=digest, plan=plan)[0].reason == "no Deployment"


def test_routed_digests_are_the_ready_stage_zero_pods_behind_the_service() -> None:
    slices = [
        {
            "endpoints": [
                {"targetRef": {"name": "chat-aaaa1111-s0-5d9f-x2"}, "conditions": {"ready": True}},
                {"targetRef": {"name": "chat-bbbb2222-s0-77aa-k1"}, "conditions": {"ready": False}},
            ]
        }
    ]
    assert rollout.routed_digests(slices, REF) == {"aaaa1111"}
    assert rollout.routed_digests([], REF) == set()
