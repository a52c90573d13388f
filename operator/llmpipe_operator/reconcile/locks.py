"""One asyncio lock per pipeline, so a spec change, a stage event and a node change never
reconcile the same pipeline at once inside this operator process."""

from __future__ import annotations

import asyncio

_locks: dict[tuple[str, str], asyncio.Lock] = {}


def pipeline_lock(namespace: str, name: str) -> asyncio.Lock:
    return _locks.setdefault((namespace, name), asyncio.Lock())


def forget(namespace: str, name: str) -> None:
    """Drop the lock of a deleted pipeline (unless someone holds it)."""
    lock = _locks.get((namespace, name))
    if lock is not None and not lock.locked():
        del _locks[(namespace, name)]
