"""The running stages' own figures into `status.measured`: the operator side of the measured
pipeline.

Every `interval_seconds` this task, for each pipeline the re-planner tracks that serves a
plan (`status.servingPlanHash`):

1. lists that plan's running stage pods and reads each one's `GET /metrics` on the HTTP port
   (every stage's pod IP; the pipeline's NetworkPolicy admits the operator there, see
   `manifests.network`). When the pipeline protects `/metrics` with its API keys
   (`spec.service.auth.protectMetrics`), stage 0 is asked with the first key of the Secret;
2. keeps the scrape, and when the previous one was of the same plan and the same stages,
   turns the growth between the two into the window's figures (`planning.speed.measure`);
3. writes them as `status.measured` next to `status.estimates` (`status.measured`), unless
   the window measured nothing (an idle pipeline keeps its last measurement);
4. when a node's stage has run more than `drift.threshold` off its estimate, one way, in
   every window for `drift.window_seconds` (`planning.speed.track_drift`), records that
   node's time factor in `status.effectiveFactors` (never in the node's labels) and hands
   the pipeline to the re-planner (`on_drift`), which re-plans through the usual
   debounce and hysteresis with the node's figures divided by the factor.

Reads are bounded (`timeout_seconds` each, all stages of a pipeline at once) and run in
this task, never in a Kopf handler. A stage that does not answer skips the pipeline's round.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import aiohttp
from lightkube import AsyncClient

from llmpipe_operator import rollout, status
from llmpipe_operator import spec as spec_mod
from llmpipe_operator.k8s import api, errors
from llmpipe_operator.manifests import names
from llmpipe_operator.planning import speed

log = logging.getLogger(__name__)

Key = tuple[str, str]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeasureSettings:
    interval_seconds: float = 30.0
    """Two scrapes make one window: a figure at most a minute old, and two small GETs per
    stage per minute."""
    timeout_seconds: float = 5.0
    drift: speed.DriftSettings = dataclasses.field(default_factory=speed.DriftSettings)
    """When a node's measured step time has left its estimate for good (50 %, 5 minutes)."""
    factor_margin: float = 0.1
    """A sustained factor within 10 % of the one recorded is not written again."""
    operator_namespace: str | None = None
    """Where the operator runs: the pipelines' NetworkPolicies admit its pods to the stages'
    HTTP port. None (the operator runs outside the cluster) adds no such rule."""


_configured = MeasureSettings()


def configure(settings: MeasureSettings) -> None:
    """Called once by `__main__` from the flags, before Kopf starts."""
    global _configured
    _configured = settings


def configured() -> MeasureSettings:
    return _configured


def stage_url(pod: Mapping[str, Any]) -> str | None:
    """`/metrics` of a running stage pod, by its IP; None while it has none."""
    ip = (pod.get("status") or {}).get("podIP")
    return f"http://{ip}:{names.HTTP_PORT}/metrics" if ip else None


class StageMetricsReader:
    """Run `run()` as a task owned by the operator; `pipelines` gives the tracked bodies."""

    def __init__(
        self,
        client: AsyncClient,
        pipelines: Callable[[], Sequence[Mapping[str, Any]]],
        settings: MeasureSettings,
        *,
        url_of: Callable[[Mapping[str, Any]], str | None] = stage_url,
        clock: Callable[[], float] = time.monotonic,
        on_drift: Callable[[Key, Mapping[str, float]], None] | None = None,
    ) -> None:
        self.client, self.pipelines, self.settings = client, pipelines, settings
        self.url_of, self.clock, self.on_drift = url_of, clock, on_drift
        self.last: dict[Key, tuple[str, speed.Scrape]] = {}
        self.drift: dict[Key, dict[str, speed.Drifting]] = {}

    async def run(self) -> None:
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.settings.timeout_seconds)
        ) as session:
            while True:
                await self.round(session)
                await asyncio.sleep(self.settings.interval_seconds)

    async def round(self, session: aiohttp.ClientSession) -> list[Key]:
        """One read of every serving pipeline; returns those whose status was written."""
        written = []
        bodies = list(self.pipelines())
        seen = set()
        for body in bodies:
            meta = body.get("metadata") or {}
            key = (str(meta.get("namespace")), str(meta.get("name")))
            seen.add(key)
            try:
                if await self.measure_pipeline(session, key, body):
                    written.append(key)
            except errors.API_ERRORS as error:
                if not (errors.is_transient(error) or errors.is_forbidden(error)):
                    raise
                log.warning("stage metrics of %s/%s: %s", *key, errors.describe(error))
        for gone in set(self.last) - seen:
            del self.last[gone]
        for gone in set(self.drift) - seen:
            del self.drift[gone]
        return written

    async def measure_pipeline(
        self, session: aiohttp.ClientSession, key: Key, body: Mapping[str, Any]
    ) -> bool:
        namespace, name = key
        digest = (body.get("status") or {}).get("servingPlanHash")
        if not digest:
            self.last.pop(key, None)
            return False
        pods = [
            p
            for p in await api.list_pods(self.client, namespace=namespace, pipeline=name)
            if _labels(p).get(names.LABEL_PLAN_HASH) == digest
            and _labels(p).get(names.LABEL_COMPONENT) == "stage"
            and (p.get("status") or {}).get("phase") == "Running"
        ]
        token = await metrics_key(self.client, namespace, body)
        scrape = await self._scrape(session, pods, token)
        if scrape is None:
            return False
        previous = self.last.get(key)
        self.last[key] = (digest, scrape)
        if previous is None or previous[0] != digest:
            return False
        if set(previous[1].stages) != set(scrape.stages):
            return False  # a stage was not read last time (or now): not one window
        result = speed.measure(previous[1], scrape)
        if result is None:
            return False
        children = await api.list_children(
            self.client, namespace=namespace, pipeline=name, kinds=("ConfigMap",)
        )
        plan = rollout.plan_of(children, digest)
        if plan is None:
            return False
        now = _now()
        report = status.measured(result, plan, now=now)
        report["planHash"] = digest
        factors = self._sustained(key, body, plan, report, at=scrape.at)
        patch: dict[str, Any] = {"measured": report}
        if factors:
            patch["effectiveFactors"] = {
                node: {speed.FACTOR: factor, "recordedAt": now, "planHash": digest}
                for node, factor in factors.items()
            }
        await api.patch_status(self.client, namespace=namespace, name=name, status=patch)
        if factors:
            log.info("%s/%s: measured node time factors %s: re-planning", *key, factors)
            if self.on_drift is not None:
                self.on_drift(key, factors)
        return True

    def _sustained(
        self,
        key: Key,
        body: Mapping[str, Any],
        plan: Mapping[str, Any],
        report: Mapping[str, Any],
        *,
        at: float,
    ) -> dict[str, float]:
        """Node -> time factor to record: drifts now sustained whose factor is new.

        A stage's estimate already includes the factor its plan was made with (the plan's
        `computeTimeFactor`, 1 without one), so the node's factor is that times the
        measured ratio: a plan kept by the hysteresis measures the same factor again,
        which is then not rewritten, and one made with the factor measures about 1."""
        ratios = {
            str(s["node"]): float(s["ratio"])
            for s in report["stages"]
            if "ratio" in s and "node" in s
        }
        state, sustained = speed.track_drift(
            self.drift.get(key, {}), ratios, now=at, settings=self.settings.drift
        )
        recorded = speed.parse_factors((body.get("status") or {}).get("effectiveFactors"))
        planned = {str(s["node"]): s for s in plan["stages"]}
        new: dict[str, float] = {}
        for node, ratio in sustained.items():
            factor = round(float(planned[node].get(speed.FACTOR, 1.0)) * ratio, 3)
            state.pop(node)  # recorded or confirmed: a further change needs a window of its own
            before = recorded.get(node)
            if before is None or abs(factor / before - 1) > self.settings.factor_margin:
                new[node] = factor
        self.drift[key] = state
        return new

    async def _scrape(
        self, session: aiohttp.ClientSession, pods: Sequence[Mapping[str, Any]], token: str | None
    ) -> speed.Scrape | None:
        urls = [(int(_labels(p).get(names.LABEL_STAGE_INDEX, -1)), self.url_of(p)) for p in pods]
        if not urls or any(url is None for _, url in urls):
            return None
        at = self.clock()
        texts = await asyncio.gather(
            *(get_metrics(session, str(url), token if index == 0 else None) for index, url in urls)
        )
        stages: dict[int, speed.StageTotals] = {}
        generated = None
        for (index, url), text in zip(urls, texts, strict=True):
            if text is None:
                return None
            try:
                totals, tokens = speed.parse_metrics(text)
            except ValueError as error:
                log.warning("stage metrics at %s unreadable: %s", url, error)
                return None
            if index in totals:
                stages[index] = totals[index]
            if index == 0:
                generated = tokens
        return speed.Scrape(at=at, stages=stages, generated_tokens=generated)


async def get_metrics(session: aiohttp.ClientSession, url: str, token: str | None) -> str | None:
    """One stage's /metrics text (bounded by the session's timeout), or None."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with session.get(url, headers=headers) as response:
            if response.status != 200:
                log.warning("stage metrics at %s: HTTP %d", url, response.status)
                return None
            return await response.text()
    except (TimeoutError, aiohttp.ClientError) as error:
        log.info("stage metrics at %s not read: %r", url, error)
        return None


async def metrics_key(client: AsyncClient, namespace: str, body: Mapping[str, Any]) -> str | None:
    """The first API key of the pipeline's Secret, when its /metrics needs one."""
    try:
        parsed = spec_mod.parse_spec(body.get("spec") or {})
    except spec_mod.SpecError:
        return None
    auth = parsed.service.auth
    if not (auth.protect_metrics and auth.api_key_secret):
        return None
    secret = await api.get_secret(client, namespace=namespace, name=auth.api_key_secret)
    return first_key((secret or {}).get("data") or {})


def first_key(data: Mapping[str, str]) -> str | None:
    """The first key of a Secret's data, read as the stage reads its mounted files (data
    keys in order, one key per line, blank lines and `#` comments skipped)."""
    for name in sorted(data):
        for line in base64.b64decode(data[name]).decode("utf-8", "replace").splitlines():
            key = line.strip()
            if key and not key.startswith("#"):
                return key
    return None


def _labels(pod: Mapping[str, Any]) -> Mapping[str, str]:
    return (pod.get("metadata") or {}).get("labels") or {}


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
