"""Read one LLMPipeline from the API server and parse its spec (the reconcile steps' input).

An unusable spec is reported on the resource (Planned=False, InvalidSpec, phase Failed)
and refused with kopf.PermanentError: retrying cannot fix it, the user must.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping
from typing import Any

import kopf
from lightkube import AsyncClient

from llmpipe_operator import spec as spec_mod
from llmpipe_operator import status
from llmpipe_operator.k8s import api
from llmpipe_operator.manifests import names
from llmpipe_operator.reconcile import errors


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """One LLMPipeline as read from the API server, with its spec parsed."""

    ref: names.PipelineRef
    spec: spec_mod.PipelineSpec
    generation: int
    body: Mapping[str, Any]

    @property
    def status(self) -> Mapping[str, Any]:
        return self.body.get("status") or {}

    @property
    def conditions(self) -> list[Mapping[str, Any]]:
        return list(self.status.get("conditions") or [])


def events_body(body: Mapping[str, Any]) -> kopf.Body:
    """The pipeline as Kopf's event poster wants it (it reads apiVersion, kind, metadata)."""
    return kopf.Body(dict(body))  # type: ignore[arg-type]


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def fetch_pipeline(client: AsyncClient, *, namespace: str, name: str) -> Pipeline | None:
    """The pipeline as stored now, spec parsed; an unusable spec is reported and refused."""
    async with errors.classified("read the LLMPipeline"):
        body = await api.get_pipeline(client, namespace=namespace, name=name)
    if body is None:
        return None
    meta = body["metadata"]
    generation = int(meta.get("generation") or 0)
    try:
        parsed = spec_mod.parse_spec(body.get("spec") or {})
    except spec_mod.SpecError as error:
        previous = list((body.get("status") or {}).get("conditions") or [])
        async with errors.classified("report the invalid spec"):
            await api.patch_status(
                client,
                namespace=namespace,
                name=name,
                status=status.invalid_spec(
                    str(error), generation=generation, now=now(), previous=previous
                ),
            )
        kopf.event(events_body(body), type="Warning", reason="InvalidSpec", message=str(error))
        raise kopf.PermanentError(f"invalid spec: {error}") from error
    ref = names.PipelineRef(name=name, namespace=namespace, uid=str(meta["uid"]))
    return Pipeline(ref=ref, spec=parsed, generation=generation, body=body)
