"""Kubernetes Events about an LLMPipeline (core/v1 Event): the one path Events leave by.

Every step that reports something a user should see (a plan, a switch, a refusal, a
re-plan) posts it here, whether it runs in a Kopf handler or in the re-planner's own task,
so no step depends on Kopf's per-handler event queue. Callers wrap the post in
`reconcile.errors.classified` like every other API call.
"""

from __future__ import annotations

import datetime
import socket
from collections.abc import Mapping
from typing import Any

from lightkube import AsyncClient
from lightkube.models.core_v1 import EventSource, ObjectReference
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Event

COMPONENT = "llmpipe-operator"
MAX_MESSAGE = 1024
"""The API server refuses longer Event messages."""


async def post(
    client: AsyncClient,
    obj: Mapping[str, Any],
    *,
    type: str,
    reason: str,
    message: str,
) -> None:
    """One Event (type Normal or Warning) about `obj` (a namespaced object as a dict)."""
    meta = obj.get("metadata") or {}
    now = datetime.datetime.now(datetime.UTC)
    event = Event(
        metadata=ObjectMeta(generateName=f"{meta['name']}.", namespace=meta["namespace"]),
        involvedObject=ObjectReference(
            apiVersion=obj.get("apiVersion"),
            kind=obj.get("kind"),
            name=meta["name"],
            namespace=meta["namespace"],
            uid=meta.get("uid"),
        ),
        type=type,
        reason=reason,
        message=message[:MAX_MESSAGE],
        source=EventSource(component=COMPONENT),
        reportingComponent=COMPONENT,
        reportingInstance=socket.gethostname()[:128],
        firstTimestamp=now,
        lastTimestamp=now,
        count=1,
    )
    await client.create(event)
