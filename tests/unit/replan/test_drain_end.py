"""When a drain ends: as soon as the old plan's stage 0 is empty, at the bound at the latest.

Covers llmpipe_operator/rollout.py `drain_over` (a table: the bound, the floor
DRAIN_MIN_SECONDS, unknown counts), `next_step` with the counts the drain task read
(`Observed.busy`: removed and reported as emptied, kept while busy or unknown, never on
the look that first found the plan unrouted), and reconcile/drain.py `busy_requests`
over the text a real stage 0 registry renders (the gauges `StageMetrics` and the OpenAI
routes register). The reads against a real API server are in
tests/cluster/replan/test_drain_watch.py; against real stage processes in
tests/dataplane/test_switch_under_load.py.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

import pytest

from llmpipe_operator import rollout
from llmpipe_operator.reconcile import drain
from llmpipe_stage.metrics import StageMetrics
from tests.support.stage_metrics import stage_0_metrics
from tests.unit.replan.test_next_step import NEW, NOW, OLD, SWITCHED, observe, routed

FLOOR = rollout.DRAIN_MIN_SECONDS

# (name, seconds draining, bound, busy) -> over
TABLE = [
    ("busy, inside the bound: drains on", 30.0, 120.0, 3, None),
    ("not read (unknown), inside the bound: drains on", 30.0, 120.0, None, None),
    ("empty, past the floor: over, early", FLOOR, 120.0, 0, "empty"),
    ("empty, but inside the floor: drains on", FLOOR - 0.1, 120.0, 0, None),
    ("busy at the bound: over", 120.0, 120.0, 5, "bound"),
    ("unknown at the bound: over", 121.0, 120.0, None, "bound"),
    ("empty at the bound: the bound says it", 120.0, 120.0, 0, "bound"),
    ("a bound under the floor: the bound wins", 2.0, 2.0, 0, "bound"),
    ("drainSeconds 0: over at once", 0.0, 0.0, 4, "bound"),
]


@pytest.mark.parametrize(
    ("draining_s", "bound_s", "busy", "over"),
    [row[1:] for row in TABLE],
    ids=[row[0] for row in TABLE],
)
def test_drain_over(draining_s: float, bound_s: float, busy: int | None, over: str | None) -> None:
    assert rollout.drain_over(draining_s=draining_s, bound_s=bound_s, busy=busy) == over


DRAINING = {"planHash": NEW, "drainingPlans": {OLD: "2026-12-01T12:00:00Z"}}


def look(*, after_s: float, busy: dict[str, int], st: Any = DRAINING) -> rollout.Action:
    observed = observe(
        target=NEW,
        children=SWITCHED,
        slices=routed(NEW),
        st=st,
        replan_spec={"drainSeconds": 120},
        now=NOW + datetime.timedelta(seconds=after_s),
    )
    return rollout.next_step(dataclasses.replace(observed, busy=busy))


def test_an_empty_stage_0_ends_the_drain_before_the_bound() -> None:
    action = look(after_s=6, busy={OLD: 0})
    assert {rollout.digest_of(o) for o in action.remove} == {OLD}
    assert action.drained == (OLD,) and action.emptied == (OLD,)
    assert action.report is not None and action.report["drainingPlans"] is None
    assert action.write_report


@pytest.mark.parametrize(
    ("after_s", "busy"),
    [(6, {OLD: 2}), (6, {}), (2, {OLD: 0}), (6, {NEW: 0})],
    ids=["busy", "not read", "inside the floor", "only another plan read"],
)
def test_the_plan_keeps_draining(after_s: float, busy: dict[str, int]) -> None:
    action = look(after_s=after_s, busy=busy)
    assert action.remove == () and action.drained == () and action.emptied == ()
    assert action.report is not None and action.report["drainingPlans"] == DRAINING["drainingPlans"]


def test_a_count_on_the_look_that_first_finds_the_plan_unrouted_does_not_end_it() -> None:
    # Its endpoint just left the Service: the count says nothing about connections
    # kube-proxy may still send it, so the drain begins (and the floor runs from here).
    action = look(after_s=600, busy={OLD: 0}, st={"planHash": NEW})
    assert action.remove == () and action.drain_started == (OLD,)


def test_a_busy_stage_0_at_the_bound_is_drained_by_the_bound() -> None:
    action = look(after_s=120, busy={OLD: 7})
    assert action.drained == (OLD,) and action.emptied == ()


def test_busy_requests_counts_what_stage_0_holds() -> None:
    metrics, routes = stage_0_metrics()
    assert drain.busy_requests(metrics.render().decode()) == 0
    metrics.in_flight.set(3)
    metrics.queue_depth.set(2)
    routes.in_progress.inc(6)
    assert drain.busy_requests(metrics.render().decode()) == 11
    metrics.in_flight.set(0)
    metrics.queue_depth.set(0)
    assert drain.busy_requests(metrics.render().decode()) == 6  # still being answered
    routes.in_progress.dec(6)
    assert drain.busy_requests(metrics.render().decode()) == 0


def test_busy_requests_is_unknown_without_every_gauge() -> None:
    metrics = StageMetrics(stage_index=0)  # no OpenAI routes: no requests gauge
    assert drain.busy_requests(metrics.render().decode()) is None
    assert drain.busy_requests("llmpipe_sequences_in_flight 0\n") is None
    assert drain.busy_requests("<html>not metrics</html>") is None
