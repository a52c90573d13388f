"""The drain's eyes: how busy each draining plan's stage 0 still is.

After a switch the old plan *drains* (`rollout.drain`): it finishes the requests it holds,
then is removed. `spec.replan.drainSeconds` bounds that; this task ends it sooner. Every
`interval_seconds`, for each tracked pipeline with plans in `status.drainingPlans`, it:

1. lists the pipeline's pods and, for each draining plan, GETs its running stage 0's
   `/metrics` (the same port and key `reconcile.measure` reads, bounded by
   `timeout_seconds`, all at once);
2. reads the requests in progress there (`busy_requests`: HTTP requests being answered,
   sequences in the ring or parked, requests queued for a slot);
3. calls `switch.advance` with those counts, which removes a plan whose stage 0 reported
   none (`rollout.drain_over`) and, as a side effect, also removes plans whose bound
   passed within an interval, not at the next 30 s safety-net sweep.

A stage 0 that does not answer (or answers without the gauges) counts as unknown: its plan
drains to the bound. The reads run in this task, never in a Kopf handler; the handlers'
own calls to `advance` pass no counts, so they end drains only at the bound.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import aiohttp
import kopf
from lightkube import AsyncClient
from prometheus_client.parser import text_string_to_metric_families

from llmpipe_operator.k8s import api, errors
from llmpipe_operator.manifests import names
from llmpipe_operator.reconcile import measure, switch

log = logging.getLogger(__name__)

BUSY_GAUGES = (
    "llmpipe_requests_in_progress",
    "llmpipe_sequences_in_flight",
    "llmpipe_queue_depth",
)
"""Stage 0's gauges of work it holds: completion requests from their first byte read to
their last byte written (covers a request still being tokenized), sequences in the ring or
parked, and requests waiting for a sequence slot."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DrainSettings:
    interval_seconds: float = 2.0
    """A drained plan goes within about this long after its last request finished; a
    small GET per draining plan, only while one drains."""
    timeout_seconds: float = 2.0
    """A stage 0 that does not answer within this is unknown this round (the next tries
    again); well under the interval's worth of waiting."""


def busy_requests(text: str) -> int | None:
    """The requests stage 0's /metrics text says it holds, or None when the text is not
    the Prometheus format or lacks one of BUSY_GAUGES (an older stage: unknown)."""
    found: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            if family.name in BUSY_GAUGES:
                for sample in family.samples:
                    if sample.name == family.name:
                        found[family.name] = found.get(family.name, 0.0) + float(sample.value)
    except ValueError:
        return None
    if set(found) != set(BUSY_GAUGES):
        return None
    return round(sum(found.values()))


def draining_plans(body: Mapping[str, Any]) -> list[str]:
    return sorted(((body.get("status") or {}).get("drainingPlans") or {}).keys())


class DrainWatcher:
    """Run `run()` as a task owned by the operator; `pipelines` gives the tracked bodies."""

    def __init__(
        self,
        client: AsyncClient,
        pipelines: Callable[[], Sequence[Mapping[str, Any]]],
        settings: DrainSettings = DrainSettings(),
        *,
        url_of: Callable[[Mapping[str, Any]], str | None] = measure.stage_url,
    ) -> None:
        self.client, self.pipelines, self.settings, self.url_of = (
            client,
            pipelines,
            settings,
            url_of,
        )

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout_seconds)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                await self.round(session)
                await asyncio.sleep(self.settings.interval_seconds)

    async def round(self, session: aiohttp.ClientSession) -> dict[tuple[str, str], dict[str, int]]:
        """One look at every pipeline that drains; returns the counts it advanced with."""
        advanced: dict[tuple[str, str], dict[str, int]] = {}
        for body in list(self.pipelines()):
            if not draining_plans(body):
                continue
            meta = body.get("metadata") or {}
            key = (str(meta.get("namespace")), str(meta.get("name")))
            try:
                busy = await self.busy(session, key, body)
                await switch.advance(self.client, namespace=key[0], name=key[1], busy=busy)
            except errors.API_ERRORS as error:
                if not (errors.is_transient(error) or errors.is_forbidden(error)):
                    raise
                log.warning("drain of %s/%s: %s", *key, errors.describe(error))
                continue
            except (kopf.TemporaryError, kopf.PermanentError) as error:
                # The next round tries again; the loop itself must keep running.
                log.warning("drain of %s/%s: %s", *key, error)
                continue
            advanced[key] = busy
        return advanced

    async def busy(
        self, session: aiohttp.ClientSession, key: tuple[str, str], body: Mapping[str, Any]
    ) -> dict[str, int]:
        """Draining plan hash -> requests its stage 0 holds, for the stage 0s that answered."""
        namespace, name = key
        digests = draining_plans(body)
        pods = await api.list_pods(self.client, namespace=namespace, pipeline=name)
        urls: dict[str, str] = {}
        for pod in pods:
            labels = (pod.get("metadata") or {}).get("labels") or {}
            digest = labels.get(names.LABEL_PLAN_HASH)
            if (
                digest in digests
                and labels.get(names.LABEL_COMPONENT) == "stage"
                and labels.get(names.LABEL_STAGE_INDEX) == "0"
                and (pod.get("status") or {}).get("phase") == "Running"
                and (url := self.url_of(pod)) is not None
            ):
                urls[str(digest)] = url
        if not urls:
            return {}
        token = await measure.metrics_key(self.client, namespace, body)
        texts = await asyncio.gather(
            *(measure.get_metrics(session, url, token) for url in urls.values())
        )
        counts = {}
        for digest, text in zip(urls, texts, strict=True):
            count = busy_requests(text) if text is not None else None
            if count is not None:
                counts[digest] = count
        return counts
