"""Node memory usage from metrics.k8s.io (metrics-server), when the cluster serves it.

metrics.k8s.io cannot be watched, so `NodeUsagePoller` polls it in the background and
keeps the latest `NodeUsage`. A cluster without metrics-server is normal (K3s can be run
without it): that is not an error, only a `note` the operator puts in the pipeline's
status, and planning then uses allocatable memory alone.

Usage includes the pipeline's own stage pods; `planning.live.usable_memory` takes that into
account.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import Any

import httpx2  # lightkube 1.x transport (its ApiError derives from httpx2.HTTPStatusError)
from lightkube import ApiError, AsyncClient
from lightkube.generic_resource import create_global_resource

from llmpipe_operator import telemetry
from llmpipe_operator.planning import inventory

log = logging.getLogger(__name__)

NodeMetrics = create_global_resource(
    group="metrics.k8s.io",
    version="v1beta1",
    kind="NodeMetrics",
    plural="nodes",
    verbs=["get", "list"],
)


@dataclasses.dataclass(frozen=True)
class NodeUsage:
    """Memory in use per node, as metrics.k8s.io last reported it."""

    served: bool
    """False when metrics.k8s.io is not served or could not be read."""
    memory_bytes: Mapping[str, int]
    """Node name -> working-set bytes in use (empty when not served)."""
    note: str
    """One line for the pipeline's status: what planning takes into account, or why not."""
    observed_at: float
    """time.monotonic() of the read."""


NOT_POLLED = NodeUsage(
    served=False,
    memory_bytes={},
    note="node metrics not read yet: planning uses allocatable memory",
    observed_at=0.0,
)


async def read_node_usage(client: AsyncClient) -> NodeUsage:
    """One read of every NodeMetrics object; absence of the API gives a note, not an error."""
    now = time.monotonic()
    try:
        usage = {_name(item): _memory(item) async for item in client.list(NodeMetrics)}
    except httpx2.HTTPStatusError as error:  # lightkube's ApiError, or a bare status error
        return NodeUsage(False, {}, _absence_note(error.response.status_code, error), now)
    except httpx2.HTTPError as error:  # the API server itself unreachable: try again next poll
        return NodeUsage(False, {}, f"metrics.k8s.io could not be read ({error})", now)
    return NodeUsage(
        served=True,
        memory_bytes=usage,
        note=f"memory usage from metrics.k8s.io ({len(usage)} nodes) is taken into account",
        observed_at=now,
    )


def _name(item: Mapping[str, Any]) -> str:
    return str(item["metadata"]["name"])


def _memory(item: Mapping[str, Any]) -> int:
    usage = item.get("usage") or {}
    return int(inventory.parse_quantity(str(usage.get("memory", "0"))))


def _absence_note(code: int, error: Exception) -> str:
    if code == 404:
        return "metrics.k8s.io is not served (no metrics-server): planning uses allocatable memory"
    if code == 403:
        return "not allowed to read metrics.k8s.io nodes (RBAC): planning uses allocatable memory"
    return (
        f"metrics.k8s.io unavailable ({code}: {_message(error)}): planning uses allocatable memory"
    )


def _message(error: Exception) -> str:
    if isinstance(error, ApiError) and error.status.message:
        return str(error.status.message)
    return str(error).splitlines()[0]


class NodeUsagePoller:
    """Polls metrics.k8s.io every `interval_seconds` and keeps the latest reading.

    Run `run()` as a task owned by the operator (started at startup, cancelled at
    cleanup); handlers only read `latest`.
    """

    def __init__(self, client: AsyncClient, *, interval_seconds: float = 30.0) -> None:
        self.client = client
        self.interval_seconds = interval_seconds
        self.latest = NOT_POLLED

    async def poll_once(self) -> NodeUsage:
        previous = self.latest
        self.latest = await read_node_usage(self.client)
        telemetry.NODE_METRICS_SERVED.set(1 if self.latest.served else 0)
        if self.latest.note != previous.note:
            log.info("node metrics: %s", self.latest.note)
        return self.latest

    async def run(self) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(self.interval_seconds)
