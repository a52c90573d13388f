"""The liveness probe: healthy while the re-planning tasks run, failing once one died.

Covers: running tasks -> "running"; a task that ended with an exception -> the probe raises
(Kopf then answers /healthz with an error and the kubelet restarts the operator).
"""

from __future__ import annotations

import asyncio
import types

import pytest

from llmpipe_operator import main


async def test_the_probe_reports_running_tasks() -> None:
    forever = asyncio.create_task(asyncio.sleep(3600), name="replanner")
    memo = types.SimpleNamespace(replan_tasks=[forever])
    try:
        assert await main.replanner_alive(memo=memo) == "running"
    finally:
        forever.cancel()


async def test_the_probe_fails_once_a_task_died() -> None:
    async def broken() -> None:
        raise KeyError("stages")

    task = asyncio.create_task(broken(), name="replanner")
    await asyncio.gather(task, return_exceptions=True)
    memo = types.SimpleNamespace(replan_tasks=[task])
    with pytest.raises(RuntimeError, match="task replanner stopped: KeyError"):
        await main.replanner_alive(memo=memo)
