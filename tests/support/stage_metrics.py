"""A stage 0's metrics registry with every series a loaded stage 0 registers on it: the
process's `StageMetrics` and the OpenAI routes' requests gauge (no torch, no model)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from llmpipe_stage.gateway.openai_api import OpenAIRoutes
from llmpipe_stage.metrics import StageMetrics


class _Status:
    """What the OpenAI routes read of their stage (gateway.protocol.Status)."""

    index = 0
    layers = (0, 1)
    progress = None

    def __init__(self, metrics: StageMetrics) -> None:
        self.registry = metrics.registry

    async def readiness(self) -> tuple[bool, str]:
        return True, ""


def stage_0_metrics() -> tuple[StageMetrics, OpenAIRoutes]:
    metrics = StageMetrics(stage_index=0)
    routes = OpenAIRoutes(
        _Status(metrics),  # type: ignore[arg-type]
        model_name="tiny",
        max_prompt_chars=100,
        executor=ThreadPoolExecutor(1),
    )
    return metrics, routes
