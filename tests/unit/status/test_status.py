"""Status: phases and conditions from what was observed.

Covers: Planned with the plan summary and estimates; Ready only when every stage is
available; Deploying while a first plan comes up; Ready=True while a new plan comes up
behind a serving one; Degraded when a stage of a Ready pipeline goes down; infeasible and
invalid specs; lastTransitionTime kept while a condition does not flip; display strings.
"""

from __future__ import annotations

import pytest

from llmpipe_operator import status
from tests.unit.manifests.builders import a_plan, a_spec

NOW, LATER = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"


@pytest.fixture
def plan() -> dict:
    return a_plan(a_spec().build())


def cond(patch: dict, kind: str) -> dict:
    return next(c for c in patch["conditions"] if c["type"] == kind)


def up(plan: dict, *down: int) -> list[status.StageAvailability]:
    return [
        status.StageAvailability(
            s["index"], s["index"] not in down, "Unschedulable: x" if s["index"] in down else ""
        )
        for s in plan["stages"]
    ]


def test_planned_reports_the_plan_summary_and_estimates(plan: dict) -> None:
    patch = status.planned(
        plan, digest="abcd1234", generation=3, now=NOW, endpoint="http://chat.ns.svc:8000/v1"
    )
    assert patch["observedGeneration"] == 3
    assert patch["planHash"] == "abcd1234"
    assert patch["stageCount"] == len(plan["stages"])
    assert [s["node"] for s in patch["plan"]["stages"]] == [s["node"] for s in plan["stages"]]
    assert patch["plan"]["stages"][0]["memory"].endswith("Mi")
    assert patch["estimates"]["estTokensPerSecond"] == round(plan["estTokensPerSecond"], 1)
    planned = cond(patch, "Planned")
    assert (planned["status"], planned["reason"]) == ("True", "Planned")
    assert plan["stages"][0]["node"] in planned["message"]
    assert patch["bottleneck"].split()[1].startswith("s")


def test_the_plan_summary_shows_stage_0s_draft_model_memory_only_with_one(plan: dict) -> None:
    assert all("draftMemoryBytes" not in s for s in status.plan_summary(plan)["stages"])
    drafted = {**plan, "stages": [dict(s) for s in plan["stages"]]}
    drafted["stages"][0]["draftMemoryBytes"] = 12 * 2**20
    first, *rest = status.plan_summary(drafted)["stages"]
    assert (first["draftMemoryBytes"], first["draftMemory"]) == (12 * 2**20, "12.0Mi")
    assert all("draftMemoryBytes" not in s for s in rest)


def test_first_plan_is_deploying_until_every_stage_is_available(plan: dict) -> None:
    patch = status.rollout(
        plan,
        status.Rollout(digest="h1", serving_digest="h1", target=up(plan, 1), serving=[]),
        status.Conditions(generation=1, now=NOW),
    )
    assert patch["phase"] == "Deploying"
    assert patch["ready"] == f"{len(plan['stages']) - 1}/{len(plan['stages'])}"
    ready = cond(patch, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "StagesPending")
    assert "s1: Unschedulable" in ready["message"]
    done = status.rollout(
        plan,
        status.Rollout(digest="h1", serving_digest="h1", target=up(plan), serving=[]),
        status.Conditions(generation=1, now=LATER, previous=patch["conditions"]),
    )
    assert done["phase"] == "Ready"
    assert cond(done, "Ready")["status"] == "True"
    assert cond(done, "Ready")["lastTransitionTime"] == LATER
    assert cond(done, "Degraded")["status"] == "False"
    assert all(s["ready"] for s in done["plan"]["stages"])


def test_a_stage_lost_after_ready_is_degraded(plan: dict) -> None:
    ready = status.rollout(
        plan,
        status.Rollout(digest="h1", serving_digest="h1", target=up(plan), serving=[]),
        status.Conditions(generation=1, now=NOW),
    )
    lost = status.rollout(
        plan,
        status.Rollout(digest="h1", serving_digest="h1", target=up(plan, 0), serving=[]),
        status.Conditions(generation=1, now=LATER, previous=ready["conditions"]),
    )
    assert lost["phase"] == "Degraded"
    assert (cond(lost, "Degraded")["status"], cond(lost, "Degraded")["reason"]) == (
        "True",
        "StageUnavailable",
    )


def test_new_plan_coming_up_behind_a_serving_one_stays_ready(plan: dict) -> None:
    patch = status.rollout(
        plan,
        status.Rollout(digest="h2", serving_digest="h1", target=up(plan, 0), serving=up(plan)),
        status.Conditions(generation=2, now=NOW),
    )
    assert patch["phase"] == "Deploying"
    assert patch["servingPlanHash"] == "h1"
    assert (cond(patch, "Ready")["status"], cond(patch, "Ready")["reason"]) == (
        "True",
        "SwitchingPlan",
    )


def test_infeasible_names_the_shortfall_and_fails_when_nothing_serves() -> None:
    patch = status.infeasible("short by 1.2 GiB", generation=4, now=NOW, serving=False)
    assert patch["phase"] == "Failed"
    planned = cond(patch, "Planned")
    assert (planned["status"], planned["reason"], planned["message"]) == (
        "False",
        "InsufficientMemory",
        "short by 1.2 GiB",
    )
    serving = status.infeasible("short", generation=4, now=NOW, serving=True)
    assert serving["phase"] == "Degraded"
    assert cond(serving, "Degraded")["status"] == "True"


def test_rollout_of_the_earlier_plan_keeps_an_unplannable_spec_degraded(plan: dict) -> None:
    """A stage-rollout report of the plan still serving, written after the current
    generation was found infeasible, keeps Degraded instead of turning back to Ready."""
    ready = status.rollout(
        plan,
        status.Rollout(digest="h1", serving_digest="h1", target=up(plan), serving=[]),
        status.Conditions(generation=1, now=NOW),
    )
    infeasible = status.infeasible(
        "short by 3.5 GiB",
        generation=2,
        now=NOW,
        serving=True,
        previous=ready["conditions"],
    )
    report = status.rollout(
        plan,
        status.Rollout(digest="h1", serving_digest="h1", target=up(plan), serving=[]),
        status.Conditions(generation=2, now=LATER, previous=infeasible["conditions"]),
    )
    assert report["phase"] == "Degraded"
    degraded = cond(report, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "InsufficientMemory")
    assert degraded["message"] == "serving the previous plan: short by 3.5 GiB"
    assert cond(report, "Ready")["status"] == "True"
    assert cond(report, "Planned")["reason"] == "InsufficientMemory"
    # once a later generation plans, the same report is Ready again
    replanned = status.planned(
        plan,
        digest="h1",
        generation=3,
        now=LATER,
        endpoint="http://x:8000/v1",
        previous=report["conditions"],
    )
    again = status.rollout(
        plan,
        status.Rollout(digest="h1", serving_digest="h1", target=up(plan), serving=[]),
        status.Conditions(generation=3, now=LATER, previous=replanned["conditions"]),
    )
    assert again["phase"] == "Ready"
    assert cond(again, "Degraded")["status"] == "False"


def test_invalid_spec_fails_and_no_nodes_is_pending() -> None:
    invalid = status.invalid_spec("spec.x is required", generation=1, now=NOW)
    assert invalid["phase"] == "Failed"
    assert cond(invalid, "Planned")["reason"] == "InvalidSpec"
    waiting = status.no_nodes("no eligible node", generation=1, now=NOW, serving=False)
    assert waiting["phase"] == "Pending"
    assert cond(waiting, "Planned")["reason"] == "NoEligibleNodes"


def test_policy_violation_fails_and_forbidden_waits_for_a_grant() -> None:
    refused = status.invalid_spec(
        "[allowedImages] x", generation=2, now=NOW, reason="PolicyViolation"
    )
    assert refused["phase"] == "Failed"
    assert (
        cond(refused, "Planned")["reason"] == cond(refused, "Ready")["reason"] == "PolicyViolation"
    )
    assert cond(refused, "Planned")["message"] == "[allowedImages] x"
    ready = status.condition("Ready", True, "StagesAvailable", "1/1", generation=1, now=NOW)
    blocked = status.forbidden("may not write", generation=3, now=LATER, previous=[ready])
    assert blocked["phase"] == "Pending" and blocked["observedGeneration"] == 3
    assert (cond(blocked, "Planned")["status"], cond(blocked, "Planned")["reason"]) == (
        "False",
        "Forbidden",
    )
    assert cond(blocked, "Ready") == ready  # only Planned changes


def test_transition_time_moves_only_when_the_status_flips() -> None:
    first = status.condition("Ready", False, "A", "a", generation=1, now=NOW)
    same = status.condition("Ready", False, "B", "b", generation=2, now=LATER, previous=[first])
    flipped = status.condition("Ready", True, "C", "c", generation=2, now=LATER, previous=[same])
    assert same["lastTransitionTime"] == NOW
    assert flipped["lastTransitionTime"] == LATER
    merged = status.merge_conditions([first, {"type": "Custom", "status": "True"}], [flipped])
    assert [c["type"] for c in merged] == ["Ready", "Custom"]


@pytest.mark.parametrize(
    "value, text", [(0.0182, "18.2ms"), (0.25, "250ms"), (0.0004, "400us"), (2.0, "2000ms")]
)
def test_seconds_display(value: float, text: str) -> None:
    assert status.format_seconds(value) == text


@pytest.mark.parametrize("value, text", [(512, "512"), (1536, "1.5Ki"), (3 * 2**30 // 2, "1.5Gi")])
def test_bytes_display(value: int, text: str) -> None:
    assert status.format_bytes(value) == text


def test_long_messages_are_truncated_in_conditions() -> None:
    huge = "does not match nodeSelector zone=" + "x" * 100 * 1024
    patch = status.infeasible(huge, generation=1, now=NOW, serving=False)
    planned = next(c for c in patch["conditions"] if c["type"] == status.PLANNED)
    assert len(planned["message"]) <= status.MESSAGE_LIMIT
    assert planned["message"].startswith("does not match nodeSelector zone=xxx")
    assert planned["message"].endswith(
        f"... ({len(huge) - status.MESSAGE_LIMIT + 40} more characters)"
    )


@pytest.mark.parametrize("length", [0, 1, status.MESSAGE_LIMIT])
def test_short_messages_are_kept_whole(length: int) -> None:
    assert status.truncate("m" * length) == "m" * length


def test_measured_sits_next_to_the_estimates_stage_by_stage() -> None:
    from llmpipe_operator.planning import speed

    plan = a_plan(a_spec().build())
    first, second = plan["stages"][0], plan["stages"][1]
    result = speed.Measured(
        window_seconds=30.04,
        tokens_per_second=41.26,
        stages=(
            speed.StageSpeed(
                0, step_seconds=float(first["computeSeconds"]) * 2, send_seconds=0.001
            ),
            speed.StageSpeed(1, step_seconds=float(second["computeSeconds"]), send_seconds=None),
        ),
    )
    report = status.measured(result, plan, now="2026-12-02T02:50:00Z")
    assert report["tokensPerSecond"] == 41.3
    assert report["measuredAt"] == "2026-12-02T02:50:00Z" and report["windowSeconds"] == 30.0
    s0, s1 = report["stages"]
    assert s0["node"] == first["node"] and s0["ratio"] == 2.0 and s0["sendSeconds"] == 0.001
    assert s0["estimatedSeconds"] == round(float(first["computeSeconds"]), 6)
    assert s1["ratio"] == 1.0 and "sendSeconds" not in s1
    assert report["bottleneckStage"] == (0 if s0["stepSeconds"] >= s1["stepSeconds"] else 1)
    assert report["bottleneck"].endswith(f"@{plan['stages'][report['bottleneckStage']]['node']}")
    assert "tokensPerSecond" not in status.measured(
        speed.Measured(30.0, None, result.stages), plan, now="t"
    )
