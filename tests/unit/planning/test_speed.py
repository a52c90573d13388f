"""What the running stages measured, from their /metrics (planning/speed.py).

Covers: the stage's own exposition (llmpipe_stage.metrics, the very registry a stage
serves) parses into its sums and counts, and stage 0's generated-token counter; text that
is not Prometheus' format is refused; two scrapes make one window (mean step time per
micro-batch, mean time per hop, tokens per second, the slowest stage as bottleneck), on a
table of cases: idle stages, a stage that restarted (counts went down), a stage without
hops, no window, stage 0 unread.
"""

from __future__ import annotations

import pytest

from llmpipe_operator.planning import speed
from llmpipe_stage.metrics import StageMetrics


def exposition(index: int, *, computes: list[float], sends: list[float], tokens: int = 0) -> str:
    metrics = StageMetrics(stage_index=index)
    for seconds in computes:
        metrics.compute.observe(seconds)
    for seconds in sends:
        metrics.send.observe(seconds)
    if tokens:
        metrics.count_tokens(tokens)
    return metrics.render().decode()


def test_the_stages_own_exposition_parses_into_sums_and_counts() -> None:
    text = exposition(1, computes=[0.02, 0.04], sends=[0.001, 0.003, 0.002])
    stages, generated = speed.parse_metrics(text)
    assert generated == 0.0  # every stage has the counter; only stage 0 counts
    (totals,) = stages.values()
    assert list(stages) == [1]
    assert totals.micro_batches == 2 and totals.compute_seconds == pytest.approx(0.06)
    assert totals.hops == 3 and totals.send_seconds == pytest.approx(0.006)


def test_stage_zero_reports_its_generated_tokens() -> None:
    stages, generated = speed.parse_metrics(exposition(0, computes=[0.01], sends=[], tokens=7))
    assert generated == 7.0
    assert stages[0].micro_batches == 1 and stages[0].hops == 0


def test_text_that_is_not_prometheus_format_is_refused() -> None:
    with pytest.raises(ValueError):
        speed.parse_metrics("<html>not metrics</html>\n")


def totals(compute: float, batches: float, send: float = 0.0, hops: float = 0.0):
    return speed.StageTotals(compute, batches, send, hops)


BEFORE = speed.Scrape(
    at=100.0,
    stages={0: totals(1.0, 100, 0.5, 100), 1: totals(3.0, 100, 0.2, 100)},
    generated_tokens=1000,
)


@pytest.mark.parametrize(
    ("after", "expected"),
    [
        # both stages stepped 50 times in 10 s: s0 20 ms + 2 ms hops, s1 60 ms; 400 tokens
        (
            speed.Scrape(
                110.0,
                {0: totals(2.0, 150, 0.6, 150), 1: totals(6.0, 150, 0.3, 150)},
                1400,
            ),
            (40.0, {0: (0.02, 0.002), 1: (0.06, 0.002)}, 1),
        ),
        # stage 1 restarted (its counts went down): left out; s0 alone is the bottleneck
        (
            speed.Scrape(110.0, {0: totals(2.0, 150, 0.6, 150), 1: totals(0.1, 3)}, 1400),
            (40.0, {0: (0.02, 0.002)}, 0),
        ),
        # a slow hop is the bottleneck: s0 computes 20 ms but each send takes 100 ms
        (
            speed.Scrape(
                110.0,
                {0: totals(2.0, 150, 5.5, 150), 1: totals(6.0, 150, 0.3, 150)},
                1400,
            ),
            (40.0, {0: (0.02, 0.1), 1: (0.06, 0.002)}, 0),
        ),
        # no hop in the window (send None); stage 0 not counted: no tokens/s
        (
            speed.Scrape(
                110.0, {0: totals(2.0, 150, 0.5, 100), 1: totals(6.0, 150, 0.2, 100)}, None
            ),
            (None, {0: (0.02, None), 1: (0.06, None)}, 1),
        ),
    ],
)
def test_two_scrapes_make_one_window(after: speed.Scrape, expected: tuple) -> None:
    tokens, stages, bottleneck = expected
    result = speed.measure(BEFORE, after)
    assert result is not None
    assert result.window_seconds == pytest.approx(10.0)
    assert result.tokens_per_second == (None if tokens is None else pytest.approx(tokens))
    got = {s.index: (s.step_seconds, s.send_seconds) for s in result.stages}
    assert got.keys() == stages.keys()
    for index, (step, send) in stages.items():
        assert got[index][0] == pytest.approx(step)
        assert got[index][1] == (None if send is None else pytest.approx(send))
    assert result.bottleneck.index == bottleneck


@pytest.mark.parametrize(
    "after",
    [
        speed.Scrape(110.0, dict(BEFORE.stages), 1000),  # idle: nothing computed
        speed.Scrape(100.0, {0: totals(2.0, 150), 1: totals(6.0, 150)}, 1400),  # no window
        speed.Scrape(110.0, {2: totals(2.0, 150)}, 1400),  # none of the stages seen before
    ],
)
def test_a_window_that_measured_nothing_gives_no_measurement(after: speed.Scrape) -> None:
    assert speed.measure(BEFORE, after) is None


SETTINGS = speed.DriftSettings(threshold=0.5, window_seconds=300.0)


def run_windows(windows: list[tuple[float, dict[str, float]]]) -> list[dict[str, float]]:
    state: dict[str, speed.Drifting] = {}
    recorded = []
    for now, ratios in windows:
        state, sustained = speed.track_drift(state, ratios, now=now, settings=SETTINGS)
        recorded.append(sustained)
    return recorded


@pytest.mark.parametrize(
    ("windows", "expected"),
    [
        # slower for 300 s in every window: recorded, at the ratio nearest 1 (2.0)
        (
            [(0, {"a": 2.5}), (150, {"a": 2.0}), (300, {"a": 3.0})],
            [{}, {}, {"a": 2.0}],
        ),
        # within 50 % of the estimate: never recorded
        ([(0, {"a": 1.4}), (300, {"a": 0.7}), (600, {"a": 1.49})], [{}, {}, {}]),
        # back within the threshold once: starts over, so 300 s later still not sustained
        (
            [(0, {"a": 2.0}), (150, {"a": 1.2}), (300, {"a": 2.0}), (600, {"a": 2.0})],
            [{}, {}, {}, {"a": 2.0}],
        ),
        # slower then faster: not one drift
        ([(0, {"a": 2.0}), (300, {"a": 0.5}), (600, {"a": 0.5})], [{}, {}, {"a": 0.5}]),
        # faster (0.4 -> 0.6 -> 0.5): recorded at the ratio nearest 1, 0.6
        ([(0, {"a": 0.4}), (150, {"a": 0.6}), (300, {"a": 0.5})], [{}, {}, {"a": 0.6}]),
        # a window without the node: starts over
        ([(0, {"a": 2.0}), (150, {}), (300, {"a": 2.0})], [{}, {}, {}]),
        # nodes are judged apart
        (
            [(0, {"a": 2.0, "b": 1.0}), (300, {"a": 2.0, "b": 2.0}), (600, {"a": 2, "b": 2})],
            [{}, {"a": 2.0}, {"a": 2.0, "b": 2.0}],
        ),
    ],
)
def test_a_drift_is_recorded_only_when_sustained(
    windows: list[tuple[float, dict[str, float]]], expected: list[dict[str, float]]
) -> None:
    assert run_windows(windows) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            {"a": {"computeTimeFactor": 2.5, "recordedAt": "t"}, "b": {"computeTimeFactor": 1}},
            {"a": 2.5, "b": 1.0},
        ),
        ({"a": {"computeTimeFactor": 0}, "b": {"computeTimeFactor": "2"}, "c": 3, "d": {}}, {}),
        ({"a": {"computeTimeFactor": True}}, {}),
        (None, {}),
        ([1, 2], {}),
    ],
)
def test_recorded_factors_are_read_and_malformed_ones_ignored(
    value: object, expected: dict
) -> None:
    assert speed.parse_factors(value) == expected
