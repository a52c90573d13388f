"""Fire-and-forget tasks that stay alive until they end (asyncio keeps only weak references).

One `TaskSet` per owner (the coordinator, the backend): `spawn` starts a coroutine in the
background and holds the task until it is done. No I/O of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable


class TaskSet:
    """The background tasks of one owner."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Future[None]] = set()

    def spawn(self, coroutine: Awaitable[None]) -> None:
        """Run `coroutine` in the background; the set keeps the task alive until it ends."""
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
