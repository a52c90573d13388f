"""Who may claim free node memory, one at a time: the process-wide planning lock and the
ledger of planned stages whose pods do not exist yet.

Ten pipelines applied at once reconcile concurrently (one task each). Without care, each
would read the same free memory and plan into it. So observing the nodes (pods and their
requests included), planning, and recording the plan's reservation happen under one
asyncio lock for the whole operator process; the API calls that follow (apply, status)
run outside it. Between a plan and its pods, the ledger (`reserve`) stands for the
pods: the next pipeline's planner counts every reserved stage of another pipeline whose
pod (same pipeline, plan hash and stage index) is not there yet, and the pod itself once
it is (`planning.live.held_memory`), so nothing is counted twice and nothing in flight is
missed. After a restart the ledger is empty, and the pods (bound, or pinned to their node
by node affinity while Pending) are what counts.

One operator process per cluster holds this lock (Kopf's peering keeps a second one
paused), so it is enough; two operators with disjoint watch namespaces still see each
other's pods and their requests, only not each other's few-second ledgers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from llmpipe_operator.planning import live

_ledger: dict[live.PipelineKey, live.Reservation] = {}
_lock: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None


@asynccontextmanager
async def planning() -> AsyncIterator[None]:
    """Hold the process-wide planning lock (observe -> plan -> reserve)."""
    global _lock
    loop = asyncio.get_running_loop()
    if _lock is None or _lock[0] is not loop:  # a fresh event loop (tests) gets its own
        _lock = (loop, asyncio.Lock())
    async with _lock[1]:
        yield


def reserve(key: live.PipelineKey, plan: Mapping[str, Any], *, digest: str) -> None:
    """Record `plan` as what `key` will hold (replacing its earlier reservation)."""
    _ledger[key] = live.Reservation(
        digest=digest,
        stages={
            int(stage["index"]): (
                str(stage["node"]),
                int(stage.get("hostMemoryBytes", stage["memoryBytes"])),
            )
            for stage in plan.get("stages") or []
        },
        gpus={
            int(stage["index"]): int(stage.get("gpus", 0))
            for stage in plan.get("stages") or []
            if int(stage.get("gpus", 0)) > 0
        },
    )


def release(key: live.PipelineKey) -> None:
    """`key` plans nothing new (infeasible, or deleted); its pods still count while they exist."""
    _ledger.pop(key, None)


def reservations() -> dict[live.PipelineKey, live.Reservation]:
    return dict(_ledger)
