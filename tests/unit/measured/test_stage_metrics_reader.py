"""The parts of the stage-metrics reader that need no API server (reconcile/measure.py).

Covers: the API key sent to stage 0 is the first one the stage itself would accept from
the mounted Secret (data keys in order, comments and blank lines skipped; none -> no
header); a stage pod's /metrics address is its pod IP on the HTTP port (None before it has
one); the operator's flags (`--measure-interval`, 0 = off, negative refused;
`--operator-namespace`); a plan records the factor each stage's estimate includes; a
recorded factor moves the plan off the node measured slow (the real planner, through
`reconcile.pipeline.plan_now`). The reads and the status write are in
tests/cluster/operator/test_measured_status.py.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from llmpipe_operator import __main__ as runner
from llmpipe_operator.manifests import names
from llmpipe_operator.reconcile import measure
from llmpipe_stage.api_keys import KeyRing


def encoded(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"keys": encoded("# rotated\n\n  sk-one  \nsk-two\n")}, "sk-one"),
        ({"b": encoded("sk-b"), "a": encoded("# none here\n")}, "sk-b"),
        ({"a": encoded("sk-a"), "b": encoded("sk-b")}, "sk-a"),
        ({"a": encoded("# only a comment\n")}, None),
        ({}, None),
    ],
)
def test_the_key_sent_is_one_the_stage_accepts(
    data: dict[str, str], expected: str | None, tmp_path: Path
) -> None:
    assert measure.first_key(data) == expected
    for name, value in data.items():  # the Secret as the kubelet mounts it for stage 0
        (tmp_path / name).write_bytes(base64.b64decode(value))
    if expected is not None:
        assert KeyRing(tmp_path).allows(f"Bearer {expected}")


def test_a_stage_is_read_at_its_pod_ip_on_the_http_port() -> None:
    pod = {"status": {"podIP": "10.42.0.7"}}
    assert measure.stage_url(pod) == f"http://10.42.0.7:{names.HTTP_PORT}/metrics"
    assert measure.stage_url({"status": {}}) is None


def test_the_measure_flags() -> None:
    args = runner.parse_args(["--all-namespaces"])
    assert args.measure_interval == 30.0 and args.operator_namespace is None
    args = runner.parse_args(
        ["--all-namespaces", "--measure-interval", "0", "--operator-namespace", "llmpipe-system"]
    )
    assert args.measure_interval == 0.0 and args.operator_namespace == "llmpipe-system"
    with pytest.raises(SystemExit):
        runner.parse_args(["--all-namespaces", "--measure-interval", "-1"])


def test_a_plan_says_which_factor_each_stage_estimate_includes() -> None:
    from llmpipe_operator.planning import live
    from llmpipe_operator.reconcile import pipeline
    from tests.unit.manifests.builders import a_spec, three_nodes

    spec = a_spec().build()
    nodes = three_nodes()
    plain = pipeline.make_plan(spec, live.LiveInventory(inventory=nodes, excluded={}))
    assert all("computeTimeFactor" not in s for s in plain["stages"])  # no factor: unchanged
    slow = plain["stages"][0]["node"]
    factored = pipeline.make_plan(
        spec, live.LiveInventory(inventory=nodes, excluded={}, time_factors={slow: 2.0})
    )
    assert {s["node"]: s.get("computeTimeFactor") for s in factored["stages"]}.get(slow) in (
        2.0,
        None,  # the slower node may have been left out of the new plan
    )
    assert all(
        s.get("computeTimeFactor") == (2.0 if s["node"] == slow else None)
        for s in factored["stages"]
    )


def test_a_recorded_factor_moves_the_plan_off_the_node_measured_slow() -> None:
    from llmpipe_operator.planning import live
    from llmpipe_operator.reconcile import pipeline
    from tests.unit.manifests.builders import a_spec

    def node(name: str) -> dict:
        return {
            "metadata": {
                "name": name,
                "labels": {"llmpipe.io/tflops": "4", "llmpipe.io/memory-bandwidth-gbps": "100"},
            },
            "spec": {},
            "status": {
                "allocatable": {"memory": "8Gi"},
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }

    spec = a_spec().placement(maxStages=1, firstStage="any").build()

    def planned_on(factors: dict[str, float]) -> list[str]:
        observed = pipeline.Observed(
            raw_nodes=[node("a"), node("b")],
            pods=[],
            owner=("team-a", "chat"),
            eligibility=live.Eligibility(),
            memory_usage={},
            reservations={},
            time_factors=factors,
        )
        plan, _, _ = pipeline.plan_now(spec, observed, rolled_out=None)
        return [s["node"] for s in plan["stages"]]

    first = planned_on({})
    assert len(first) == 1
    assert planned_on({first[0]: 3.0}) == [n for n in ("a", "b") if n != first[0]]
