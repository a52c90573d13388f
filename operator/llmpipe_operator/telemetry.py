"""The operator's Prometheus metrics and the HTTP endpoint that serves them.

What an operator of llmpipe wants on a dashboard: how many plans were computed and how
long planning takes, how often pipelines re-plan and why, and how many pipelines are in
each phase. The metrics live in their own registry (no process/GC collectors from other
libraries' import side effects); `serve` exposes it at `GET /metrics` on the metrics port
(`--metrics-port`, Helm `operator.metricsPort`).

Recording is cheap and never raises; serving is the only I/O here.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import prometheus_client
from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

REGISTRY = prometheus_client.CollectorRegistry(auto_describe=True)

PHASES = ("Pending", "Planning", "Deploying", "Ready", "Degraded", "Failed")

PLANS_COMPUTED = prometheus_client.Counter(
    "llmpipe_plans_computed",
    "Plans computed, by result (feasible or infeasible).",
    ["result"],
    registry=REGISTRY,
)
PLAN_DURATION = prometheus_client.Histogram(
    "llmpipe_plan_duration_seconds",
    "Time to compute one plan (inventory + partition).",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
REPLANS = prometheus_client.Counter(
    "llmpipe_replans",
    "Re-plans caused by node changes, by the most telling change (cause) and outcome "
    "(switched, kept: below the margin or unchanged, infeasible, timed-out).",
    ["cause", "outcome"],
    registry=REGISTRY,
)
SWITCH_DURATION = prometheus_client.Histogram(
    "llmpipe_switch_duration_seconds",
    "Time from a new plan's rollout start to the user-facing Service routing to it "
    "(switches from a serving plan only; status timestamps have 1 s resolution).",
    buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
    registry=REGISTRY,
)
PIPELINES = prometheus_client.Gauge(
    "llmpipe_pipelines",
    "LLMPipelines by phase.",
    ["phase"],
    registry=REGISTRY,
)
NODE_METRICS_SERVED = prometheus_client.Gauge(
    "llmpipe_node_metrics_served",
    "1 when metrics.k8s.io node usage is read, 0 when it is not served or unreadable.",
    registry=REGISTRY,
)

_phases: dict[tuple[str, str], str] = {}
for _phase in PHASES:
    PIPELINES.labels(phase=_phase).set(0)


@contextlib.contextmanager
def timed_plan() -> Iterator[None]:
    """Time a planning call: `with telemetry.timed_plan(): plan = planner.plan_pipeline(...)`."""
    started = time.perf_counter()
    try:
        yield
    finally:
        PLAN_DURATION.observe(time.perf_counter() - started)


def plan_computed(*, feasible: bool) -> None:
    PLANS_COMPUTED.labels(result="feasible" if feasible else "infeasible").inc()


def replanned(*, cause: str, outcome: str) -> None:
    REPLANS.labels(cause=cause, outcome=outcome).inc()


def set_phase(namespace: str, name: str, phase: str) -> None:
    """Remember a pipeline's phase; the gauge counts pipelines per phase."""
    _phases[(namespace, name)] = phase
    _refresh_phases()


def forget_pipeline(namespace: str, name: str) -> None:
    _phases.pop((namespace, name), None)
    _refresh_phases()


def _refresh_phases() -> None:
    counts = dict.fromkeys(PHASES, 0)
    for phase in _phases.values():
        counts[phase] = counts.get(phase, 0) + 1
    for phase, count in counts.items():
        PIPELINES.labels(phase=phase).set(count)


def exposition() -> bytes:
    """The metrics in the Prometheus text format."""
    return prometheus_client.generate_latest(REGISTRY)


async def serve(port: int, *, host: str = "0.0.0.0") -> web.AppRunner:
    """Serve `GET /metrics` on `host:port` in the running event loop; `cleanup()` stops it."""
    app = web.Application()
    app.router.add_get("/metrics", make_aiohttp_handler(REGISTRY))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
