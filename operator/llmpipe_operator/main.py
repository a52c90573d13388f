"""Kopf handlers: decorate, pick out the pipeline, call reconcile, return. Nothing else.

- create / update of spec / resume -> reconcile.pipeline.reconcile_pipeline (plan + deploy)
- a stage Deployment or the endpoint's EndpointSlice changes -> reconcile.switch.advance
- every pipeline, every 30 s -> reconcile.switch.advance (safety net for missed events)

No finalizers: children are deleted by the garbage collector through owner references, so
deleting a pipeline never waits on the operator.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import kopf

from llmpipe_operator.k8s import api
from llmpipe_operator.manifests import names
from llmpipe_operator.reconcile import pipeline, switch

RESOURCE = (names.GROUP, names.VERSION, names.PLURAL)
SAFETY_NET_SECONDS = 30.0
"""Events are the trigger; the timer only catches what a dropped watch missed."""


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Handler progress lives in annotations under our own prefix, not in .status, which
    # belongs to the pipeline's user-facing status.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="llmpipe.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="llmpipe.io", key="last-handled-configuration"
    )
    settings.persistence.finalizer = "llmpipe.io/finalizer"  # never added: no delete handlers
    settings.posting.level = logging.WARNING  # our own Events say what happened
    settings.peering.standalone = True  # one replica (Recreate); no peering objects needed
    # Watches that stay healthy for days: the server closes each watch after a while and
    # Kopf reconnects; a client timeout catches connections that silently died.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = 60
    memo.client = api.make_client()


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    await memo.client.close()


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE, field="spec")
async def reconcile_spec(name: str, namespace: str | None, memo: Any, **_: Any) -> None:
    await pipeline.reconcile_pipeline(memo.client, namespace=_ns(namespace), name=name)


@kopf.on.event(
    "apps",
    "v1",
    "deployments",
    labels={names.LABEL_PIPELINE: kopf.PRESENT, names.LABEL_COMPONENT: "stage"},
)
async def stage_changed(
    namespace: str | None, labels: Mapping[str, str], memo: Any, **_: Any
) -> None:
    await switch.advance(memo.client, namespace=_ns(namespace), name=labels[names.LABEL_PIPELINE])


@kopf.on.event(
    "discovery.k8s.io",
    "v1",
    "endpointslices",
    labels={names.LABEL_PIPELINE: kopf.PRESENT, names.LABEL_COMPONENT: "endpoint"},
)
async def endpoints_changed(
    namespace: str | None, labels: Mapping[str, str], memo: Any, **_: Any
) -> None:
    await switch.advance(memo.client, namespace=_ns(namespace), name=labels[names.LABEL_PIPELINE])


@kopf.timer(*RESOURCE, interval=SAFETY_NET_SECONDS, initial_delay=SAFETY_NET_SECONDS)
async def safety_net(name: str, namespace: str | None, memo: Any, **_: Any) -> None:
    await switch.advance(memo.client, namespace=_ns(namespace), name=name)


def _ns(namespace: str | None) -> str:
    """Every resource handled here is namespaced; Kopf types the argument as optional."""
    if namespace is None:
        raise kopf.PermanentError("a namespaced object arrived without a namespace")
    return namespace
