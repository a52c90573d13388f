"""The switch timeout: when a rollout that runs beside a serving plan counts as stalled.

Covers: no switch (first plan, same plan), within and past the timeout, the default
timeout, all stages ready (no stall), and the message naming the plans and the stages.
"""

from __future__ import annotations

import datetime

import pytest

from llmpipe_operator import status
from llmpipe_operator.planning import replan

T0 = datetime.datetime(2026, 11, 21, 1, 0, 0, tzinfo=datetime.UTC)


def rollout(target: str = "bbbb2222", serving: str | None = "aaaa1111") -> dict:
    return {
        "planHash": target,
        "servingPlanHash": serving,
        "rolloutStarted": "2026-11-21T01:00:00Z",
    }


def at(seconds: float) -> datetime.datetime:
    return T0 + datetime.timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("st", "spec", "seconds", "overdue"),
    [
        (rollout(serving=None), None, 9999, False),  # a first plan: nothing else could serve
        (rollout(target="aaaa1111"), None, 9999, False),  # not switching
        (rollout(), {"switchTimeoutSeconds": 60}, 59, False),
        (rollout(), {"switchTimeoutSeconds": 60}, 60, True),
        (rollout(), None, 599, False),  # default 600 s
        (rollout(), None, 600, True),
        ({"planHash": "b", "servingPlanHash": "a"}, None, 9999, False),  # start unknown
    ],
)
def test_switch_overdue(st, spec, seconds, overdue) -> None:
    assert (replan.switch_overdue(st, spec, now=at(seconds)) is not None) is overdue


def test_a_stalled_switch_names_the_plans_and_the_stages() -> None:
    message = replan.stalled_switch(
        rollout(), {"switchTimeoutSeconds": 60}, ["s1: Unschedulable: 0/5 nodes"], now=at(61)
    )
    assert message == (
        "plan bbbb2222 is not available within spec.replan.switchTimeoutSeconds=60: "
        "s1: Unschedulable: 0/5 nodes; plan aaaa1111 keeps serving"
    )


def test_no_stall_when_every_stage_is_ready() -> None:
    assert replan.stalled_switch(rollout(), None, [], now=at(9999)) is None


def test_rollout_reports_a_stalled_switch_as_degraded_while_the_old_plan_serves() -> None:
    plan = {
        "objective": "throughput",
        "bottleneckSeconds": 0.01,
        "tokenLatencySeconds": 0.02,
        "estTokensPerSecond": 400.0,
        "stages": [
            {"index": 0, "node": "a", "layerStart": 0, "layerEnd": 4, "memoryBytes": 1,
             "computeSeconds": 0.01, "transferSeconds": 0.0},
            {"index": 1, "node": "b", "layerStart": 4, "layerEnd": 8, "memoryBytes": 1,
             "computeSeconds": 0.01, "transferSeconds": 0.0},
        ],
    }  # fmt: skip
    common = {
        "digest": "bbbb2222",
        "serving_digest": "aaaa1111",
        "target": [status.StageAvailability(0, True), status.StageAvailability(1, False, "x")],
        "serving": [status.StageAvailability(0, True)],
    }
    conds = status.Conditions(generation=1, now="2026-11-21T01:10:00Z")
    switching = status.rollout(plan, status.Rollout(**common), conds)
    assert switching["phase"] == "Deploying"
    stalled = status.rollout(
        plan, status.Rollout(**common, stalled="plan bbbb2222 is not available ..."), conds
    )
    assert stalled["phase"] == "Degraded"
    degraded = next(c for c in stalled["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "SwitchTimedOut")
    ready = next(c for c in stalled["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"  # the old plan still serves
