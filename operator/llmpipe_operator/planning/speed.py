"""What the running stages measured, from their `/metrics` text. Pure: text in, figures out.

Every stage exports, per micro-batch, the time it computed (`llmpipe_stage_compute_seconds`),
and per hop the time the next stage took to accept it (`llmpipe_stage_send_seconds`); stage
0 also counts the tokens it generated (`llmpipe_generated_tokens`). Those are cumulative, so
one scrape says nothing about now: `measure` takes two scrapes of the same stages and turns
the growth between them into the window's figures (mean step time per micro-batch and per
hop, tokens per second). A stage whose counts went down restarted in the window and is left
out; a window in which no stage computed anything gives no measurement (an idle pipeline
keeps its last one).

The step time is the mean over every micro-batch of the window, prefills included: under a
steady decode load it is the decode step the cost model estimates as `computeSeconds`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from prometheus_client.parser import text_string_to_metric_families

COMPUTE = "llmpipe_stage_compute_seconds"
SEND = "llmpipe_stage_send_seconds"
GENERATED = "llmpipe_generated_tokens"


@dataclasses.dataclass(frozen=True)
class StageTotals:
    """One stage's cumulative sums and counts, as one scrape read them."""

    compute_seconds: float = 0.0
    micro_batches: float = 0.0
    send_seconds: float = 0.0
    hops: float = 0.0


@dataclasses.dataclass(frozen=True)
class Scrape:
    """Every stage of one plan, read at `at` (time.monotonic())."""

    at: float
    stages: Mapping[int, StageTotals]
    generated_tokens: float | None = None
    """Stage 0's counter; None when stage 0 could not be read."""


@dataclasses.dataclass(frozen=True)
class StageSpeed:
    index: int
    step_seconds: float
    """Mean compute time per micro-batch in the window."""
    send_seconds: float | None
    """Mean time per hop to the next stage; None when no hop was sent."""

    @property
    def slowest(self) -> float:
        return max(self.step_seconds, self.send_seconds or 0.0)


@dataclasses.dataclass(frozen=True)
class Measured:
    window_seconds: float
    tokens_per_second: float | None
    stages: tuple[StageSpeed, ...]

    @property
    def bottleneck(self) -> StageSpeed:
        return max(self.stages, key=lambda s: s.slowest)


def parse_metrics(text: str) -> tuple[dict[int, StageTotals], float | None]:
    """The stage totals by stage index, and the generated-token count if the text has it.

    Raises ValueError for text that is not the Prometheus exposition format."""
    sums: dict[tuple[int, str], float] = {}
    generated: float | None = None
    for family in text_string_to_metric_families(text):
        if family.name == GENERATED:
            for sample in family.samples:
                if sample.name == GENERATED + "_total":
                    generated = float(sample.value)
            continue
        if family.name not in (COMPUTE, SEND):
            continue
        for sample in family.samples:
            if sample.name in (family.name + "_sum", family.name + "_count"):
                stage = int(sample.labels["stage"])
                sums[(stage, sample.name)] = float(sample.value)
    stages = {
        stage: StageTotals(
            compute_seconds=sums.get((stage, COMPUTE + "_sum"), 0.0),
            micro_batches=sums.get((stage, COMPUTE + "_count"), 0.0),
            send_seconds=sums.get((stage, SEND + "_sum"), 0.0),
            hops=sums.get((stage, SEND + "_count"), 0.0),
        )
        for stage in sorted({s for s, _ in sums})
    }
    return stages, generated


def measure(previous: Scrape, current: Scrape) -> Measured | None:
    """The window between two scrapes, or None when it measured nothing."""
    window = current.at - previous.at
    if window <= 0:
        return None
    speeds = []
    for index, now in sorted(current.stages.items()):
        before = previous.stages.get(index)
        if before is None:
            continue
        batches = now.micro_batches - before.micro_batches
        hops = now.hops - before.hops
        if batches <= 0 or hops < 0 or now.compute_seconds < before.compute_seconds:
            continue  # idle in the window, or restarted (its counts went down)
        send = (now.send_seconds - before.send_seconds) / hops if hops > 0 else None
        step = (now.compute_seconds - before.compute_seconds) / batches
        speeds.append(StageSpeed(index, step, send))
    if not speeds:
        return None
    tokens = None
    if current.generated_tokens is not None and previous.generated_tokens is not None:
        grown = current.generated_tokens - previous.generated_tokens
        tokens = grown / window if grown >= 0 else None
    return Measured(window, tokens, tuple(speeds))


@dataclasses.dataclass(frozen=True)
class DriftSettings:
    """When a node's measured step time has left its estimate for good."""

    threshold: float = 0.5
    """A stage is off its estimate when measured / estimated is above 1 + threshold or below
    1 / (1 + threshold): 50 % is well beyond the spread of repeated windows."""
    window_seconds: float = 300.0
    """...and sustained: off, in the same direction, in every window for this long."""


@dataclasses.dataclass(frozen=True)
class Drifting:
    """A node off its estimate since `since` (monotonic seconds)."""

    since: float
    nearest: float
    """Of the ratios seen since then, the one nearest 1: the factor a sustained drift
    records, so one noisy window never overstates it."""


def is_off(ratio: float, settings: DriftSettings) -> bool:
    return ratio > 1 + settings.threshold or ratio < 1 / (1 + settings.threshold)


def track_drift(
    state: Mapping[str, Drifting],
    ratios: Mapping[str, float],
    *,
    now: float,
    settings: DriftSettings = DriftSettings(),
) -> tuple[dict[str, Drifting], dict[str, float]]:
    """(the new state, node -> factor for each node whose drift is now sustained).

    `ratios` is this window's measured / estimated step time by node. A node back within
    the threshold, one that turned from slower to faster (or back), or one not measured in
    this window starts over: sustained means every window, one direction. The factor is a
    time factor (2.0: the node computes its stages in twice the estimated time)."""
    kept: dict[str, Drifting] = {}
    sustained: dict[str, float] = {}
    for node, ratio in ratios.items():
        if ratio <= 0 or not is_off(ratio, settings):
            continue
        before = state.get(node)
        if before is None or (before.nearest > 1) != (ratio > 1):
            entry = Drifting(since=now, nearest=ratio)
        else:
            nearest = min(before.nearest, ratio) if ratio > 1 else max(before.nearest, ratio)
            entry = Drifting(since=before.since, nearest=nearest)
        kept[node] = entry
        if now - entry.since >= settings.window_seconds:
            sustained[node] = entry.nearest
    return kept, sustained


FACTOR = "computeTimeFactor"
"""`status.effectiveFactors.<node>.computeTimeFactor`: how many times the estimate the node
takes to compute, as measured; the planner divides the node's TFLOP/s and memory bandwidth
by it (`planning.live.build_inventory`). Kept in the pipeline's status, never in the
node's labels (a person's figures stay theirs)."""


def parse_factors(value: object) -> dict[str, float]:
    """node -> time factor from `status.effectiveFactors`; malformed entries are ignored."""
    factors: dict[str, float] = {}
    if not isinstance(value, Mapping):
        return factors
    for node, entry in value.items():
        factor = entry.get(FACTOR) if isinstance(entry, Mapping) else None
        if isinstance(factor, int | float) and not isinstance(factor, bool) and factor > 0:
            factors[str(node)] = float(factor)
    return factors
