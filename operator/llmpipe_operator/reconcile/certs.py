"""The stages' certificates: issue them with a plan, renew them before they expire.

- `ensure_stage_certificates` (a step of `pipeline.deploy_plan`, after the plan ConfigMap
  and before the Deployments): the pipeline's CA Secret exists, and every stage of the
  plan has a Secret with a certificate from that CA naming it, not yet due for renewal.
- `Renewer`: a task owned by the operator that runs the same check for every plan of every
  pipeline it knows, often enough that no certificate is missed (`check_seconds`). A
  renewed Secret reaches the pod through the kubelet's volume refresh and the stage reloads
  its files; no pod restarts, no connection drops.

The certificates themselves come from `pki` and the Secrets from `manifests.tls`; this
module only reads, decides with those, and writes.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import kopf
from lightkube import AsyncClient

from llmpipe_common import pki
from llmpipe_operator.k8s import api
from llmpipe_operator.manifests import names
from llmpipe_operator.manifests import tls as tls_manifests
from llmpipe_operator.reconcile import errors, locks

log = logging.getLogger(__name__)

_settings = pki.Validity()


def configure(validity: pki.Validity) -> None:
    """Set the certificate lifetimes (`python -m llmpipe_operator --stage-cert-*`)."""
    global _settings
    _settings = validity


def settings() -> pki.Validity:
    return _settings


def check_seconds(validity: pki.Validity) -> float:
    """How often the Renewer looks: a few times within the renewal window, at most a minute."""
    window = validity.leaf_seconds * (1 - validity.renew_fraction)
    return max(1.0, min(60.0, window / 4))


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


async def ensure_ca(client: AsyncClient, ref: names.PipelineRef) -> pki.KeyPair:
    """The pipeline's CA, created on first use. Call under the pipeline's lock."""
    async with errors.classified("read the pipeline's CA"):
        secret = await api.get_secret(
            client, namespace=ref.namespace, name=names.ca_secret_name(ref)
        )
    ca = tls_manifests.read_ca(secret, pipeline=ref)
    if ca is not None:
        return ca
    if secret is not None:
        log.warning(
            "%s/%s: the CA Secret %s is unusable or not this pipeline's; creating a new CA "
            "(every stage gets a new certificate)",
            ref.namespace,
            ref.name,
            names.ca_secret_name(ref),
        )
    ca = pki.new_ca(namespace=ref.namespace, pipeline=ref.name, now=utcnow(), validity=_settings)
    async with errors.classified("store the pipeline's CA"):
        await api.apply_objects(client, [tls_manifests.build_ca_secret(ref, ca)])
    return ca


async def ensure_stage_certificates(
    client: AsyncClient, ref: names.PipelineRef, *, digest: str, stage_count: int
) -> list[int]:
    """Issue what is missing or due for the plan's stages; returns the stages issued.
    The plan ConfigMap must exist (it owns the Secrets). Call under the pipeline's lock."""
    async with errors.classified("read the plan ConfigMap"):
        configmap = await api.get_configmap(
            client, namespace=ref.namespace, name=names.plan_configmap_name(ref, digest)
        )
    if configmap is None:
        raise kopf.TemporaryError(
            f"the plan ConfigMap of {digest} is missing; certificates wait for it",
            delay=errors.TRANSIENT_DELAY_SECONDS,
        )
    ca = await ensure_ca(client, ref)
    now = utcnow()
    issued = []
    for index in range(stage_count):
        if await _ensure_stage(client, ref, ca, configmap, digest=digest, index=index, now=now):
            issued.append(index)
    return issued


async def _ensure_stage(
    client: AsyncClient,
    ref: names.PipelineRef,
    ca: pki.KeyPair,
    configmap: Mapping[str, Any],
    *,
    digest: str,
    index: int,
    now: datetime.datetime,
) -> bool:
    name = names.stage_tls_secret_name(ref, digest, index)
    identity = tls_manifests.stage_identity(ref, digest, index)
    hosts = names.stage_hosts(ref, digest, index)
    async with errors.classified(f"read the certificate of stage {index}"):
        secret = await api.get_secret(client, namespace=ref.namespace, name=name)
    problem = tls_manifests.stage_secret_problem(
        secret, ca_pem=ca.cert_pem, identity=identity, hosts=hosts, now=now, validity=_settings
    )
    if problem is None:
        return False
    pair = pki.issue_stage(ca, identity, hosts=hosts, now=now, validity=_settings)
    body = tls_manifests.build_stage_secret(
        ref,
        digest=digest,
        index=index,
        ca_pem=ca.cert_pem,
        issued=pair,
        plan_configmap_uid=str(configmap["metadata"]["uid"]),
    )
    async with errors.classified(f"store the certificate of stage {index}"):
        await api.apply_objects(client, [body])
    log.info("%s/%s: issued the certificate of %s (%s)", ref.namespace, ref.name, name, problem)
    return True


async def renew_pipeline(client: AsyncClient, *, namespace: str, name: str) -> list[str]:
    """Renew what is due in every plan the pipeline has now; returns the Secrets written."""
    async with locks.pipeline_lock(namespace, name):
        async with errors.classified("read the LLMPipeline"):
            body = await api.get_pipeline(client, namespace=namespace, name=name)
        if body is None:
            return []
        ref = names.PipelineRef(name=name, namespace=namespace, uid=str(body["metadata"]["uid"]))
        async with errors.classified("list the pipeline's plans"):
            children = await api.list_children(
                client, namespace=namespace, pipeline=name, kinds=("ConfigMap",)
            )
        renewed = []
        for digest, count in _plans(children):
            for index in await ensure_stage_certificates(
                client, ref, digest=digest, stage_count=count
            ):
                renewed.append(names.stage_tls_secret_name(ref, digest, index))
        return renewed


def _plans(configmaps: Iterable[Mapping[str, Any]]) -> list[tuple[str, int]]:
    """(plan hash, stage count) of each plan ConfigMap."""
    found = []
    for cm in configmaps:
        labels = (cm.get("metadata") or {}).get("labels") or {}
        digest = labels.get(names.LABEL_PLAN_HASH)
        if labels.get(names.LABEL_COMPONENT) != "plan" or not digest:
            continue
        try:
            stages = json.loads((cm.get("data") or {}).get("plan.json", "{}"))["stages"]
        except (ValueError, KeyError, TypeError):
            continue  # not a plan the operator wrote; nothing to certify
        found.append((str(digest), len(stages)))
    return found


class Renewer:
    """Renews due stage certificates of the pipelines `pipelines()` names, forever."""

    def __init__(
        self, client: AsyncClient, *, pipelines: Callable[[], Iterable[tuple[str, str]]]
    ) -> None:
        self.client = client
        self.pipelines = pipelines

    async def run(self) -> None:
        while True:
            await asyncio.sleep(check_seconds(_settings))
            await self.renew_all()

    async def renew_all(self) -> None:
        for namespace, name in list(self.pipelines()):
            try:
                await renew_pipeline(self.client, namespace=namespace, name=name)
            except (kopf.TemporaryError, kopf.PermanentError) as error:
                # The next round tries again (well before expiry); the loop must keep running.
                log.warning("renewing certificates of %s/%s failed: %s", namespace, name, error)
