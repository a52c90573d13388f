"""Read one LLMPipeline from the API server, parse its spec and hold it to the cluster's
policy (the reconcile steps' input).

An unusable spec is reported on the resource (Planned=False, InvalidSpec, phase Failed)
and refused with kopf.PermanentError: retrying cannot fix it, the user must. A spec the
admin's policy refuses (one that got past the admission policy, e.g. created before it was
installed) is reported the same way with reason PolicyViolation, and whatever the pipeline
ran before is deleted: nothing runs that the policy forbids.

The policy is configured once, at start-up, before Kopf starts (`configure_policy`, called
by `python -m llmpipe_operator --policy FILE`); until then it is the safe default.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping
from typing import Any

import kopf
from lightkube import AsyncClient

from llmpipe_operator import policy as policy_mod
from llmpipe_operator import spec as spec_mod
from llmpipe_operator import status
from llmpipe_operator.k8s import api, events
from llmpipe_operator.manifests import names
from llmpipe_operator.reconcile import errors

_policy = policy_mod.default_policy()


def configure_policy(policy: policy_mod.Policy) -> None:
    """Set the cluster's policy for every later reconcile (start-up only)."""
    global _policy
    _policy = policy


def current_policy() -> policy_mod.Policy:
    return _policy


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
    previous = list((body.get("status") or {}).get("conditions") or [])
    try:
        parsed = spec_mod.parse_spec(body.get("spec") or {})
    except spec_mod.SpecError as error:
        async with errors.classified("report the invalid spec"):
            await api.patch_status(
                client,
                namespace=namespace,
                name=name,
                status=status.invalid_spec(
                    str(error), generation=generation, now=now(), previous=previous
                ),
            )
        async with errors.classified("post the InvalidSpec Event"):
            await events.post(
                client,
                body,
                type="Warning",
                reason="InvalidSpec",
                message=status.truncate(str(error)),
            )
        raise kopf.PermanentError(f"invalid spec: {error}") from error
    try:
        resolved = policy_mod.resolve(parsed, _policy)
    except policy_mod.PolicyViolation as violation:
        await refuse_by_policy(client, body, violation, generation=generation, previous=previous)
        raise kopf.PermanentError(f"refused by the cluster's llmpipe policy: {violation}") from None
    ref = names.PipelineRef(name=name, namespace=namespace, uid=str(meta["uid"]))
    return Pipeline(ref=ref, spec=resolved, generation=generation, body=body)


async def refuse_by_policy(
    client: AsyncClient,
    body: Mapping[str, Any],
    violation: policy_mod.PolicyViolation,
    *,
    generation: int,
    previous: list[Mapping[str, Any]],
) -> None:
    """Delete what the pipeline ran, report Planned=False PolicyViolation, post an Event
    (once per distinct message: this runs again on every watch event of the pipeline)."""
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    message = f"refused by the cluster's llmpipe policy: {violation}"
    async with errors.classified("remove what a refused spec ran"):
        children = await api.list_children(client, namespace=namespace, pipeline=name)
        children.sort(key=lambda o: {"Deployment": 0, "Service": 1}.get(str(o["kind"]), 2))
        await api.delete_objects(client, children)
    patch = status.invalid_spec(
        message,
        generation=generation,
        now=now(),
        previous=previous,
        reason=status.REASON_POLICY_VIOLATION,
    )
    patch.update(status.no_plan_fields())
    async with errors.classified("report the policy violation"):
        await api.patch_status(client, namespace=namespace, name=name, status=patch)
    already = any(
        c.get("type") == status.PLANNED
        and c.get("reason") == status.REASON_POLICY_VIOLATION
        and c.get("message") == message
        for c in previous
    )
    if not already:
        async with errors.classified("post the PolicyViolation Event"):
            await events.post(
                client,
                body,
                type="Warning",
                reason=status.REASON_POLICY_VIOLATION,
                message=message,
            )
