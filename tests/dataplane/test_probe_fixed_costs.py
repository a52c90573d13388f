"""The node probe's version 3 figures, measured for real (tiny budgets) and read back.

Covers: one probe run reports the fixed costs (per layer, per layer and token, per step,
per message hop) and the CPU product curve at every token count, measured on the stage
runtime's decode step over layers of the asked shape; a wider layer's step takes longer
than a narrower one's at the same token count; the figures go through
the `llmpipe.io/measured` annotation into the planner's node (`planning.live`) unchanged;
the stage runtime's decode step over five layers takes longer than over one (the per-layer
term is that difference, so it is positive); a product of 32 tokens costs no less per
call than one of 1. Orderings only: no timed assertion.
"""

from __future__ import annotations

import json

import pytest

from llmpipe_operator.planning import cost, live, measured
from llmpipe_stage import probe

BUDGET = probe.Budget(
    compute_seconds=0.05,
    memory_seconds=0.05,
    memory_bytes=16 * 2**20,
    products_seconds=0.3,
    layer_seconds=0.3,
    hop_seconds=0.1,
)


SHAPE = probe.LayerShape(hidden=128, intermediate=352, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def facts() -> dict:
    return probe.measure_node(dtype="float32", device="cpu", budget=BUDGET, shape=SHAPE)


def test_a_probe_run_reports_the_fixed_costs_and_the_product_curve(facts: dict) -> None:
    assert facts["probeVersion"] == "3"
    for key in ("layerStepSeconds", "stepSeconds", "hopSeconds"):
        assert facts[key] > 0, key
    assert facts["layerTokenSeconds"] >= 0
    curve = facts["productSecondsPerByte"]
    assert sorted(int(t) for t in curve) == list(probe.PRODUCT_TOKENS)
    assert all(rate > 0 for rate in curve.values())
    # a call of 32 tokens costs no less than one of 1 (per byte of weights)
    assert curve["32"] >= curve["1"]
    assert "(5, 1)" in facts["method"]["layerStepSeconds"]
    assert "StageRuntime decode step" in facts["method"]["productSecondsPerByte"]
    assert "shape 128,352,4,2" in facts["method"]["productSecondsPerByte"]


def test_the_figures_reach_the_planners_node_unchanged(facts: dict) -> None:
    node = {
        "metadata": {
            "name": "n",
            "labels": {},
            "annotations": {measured.ANNOTATION_MEASURED: measured.render(facts)},
        },
        "spec": {},
        "status": {
            "allocatable": {"memory": "4Gi"},
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }
    (planned,) = live.build_inventory([node], eligibility=live.Eligibility()).inventory.nodes
    timings = cost.timings(planned)
    assert timings.layer_seconds == facts["layerStepSeconds"]
    assert timings.hop_seconds == facts["hopSeconds"]
    assert dict(timings.products) == {
        float(t): r for t, r in facts["productSecondsPerByte"].items()
    }
    assert json.loads(measured.render(facts))["probeVersion"] == "3"


def test_more_layers_take_longer_on_the_runtime_decode_step() -> None:
    one = probe._decode_step_seconds(layers=1, tokens=1, dtype="float32", device="cpu", seconds=0.2)
    five = probe._decode_step_seconds(
        layers=5, tokens=1, dtype="float32", device="cpu", seconds=0.2
    )
    assert five > one > 0


def test_a_wider_layer_takes_longer_on_the_runtime_decode_step() -> None:
    narrow = probe.LayerShape(hidden=64, intermediate=176, heads=2, kv_heads=1)
    wide = probe.LayerShape(hidden=512, intermediate=1408, heads=8, kv_heads=4)
    times = {
        shape: probe._decode_steps(
            layers=2, token_counts=(8,), dtype="float32", device="cpu", seconds=0.2,
            shape=shape, prompt=1,
        )[8]
        for shape in (narrow, wide)
    }  # fmt: skip
    # 64x the weight bytes: far more than the noise of a shared machine
    assert times[wide] > times[narrow] > 0
