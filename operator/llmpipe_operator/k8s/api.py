"""Calls to the Kubernetes API server: the only module that makes them (lightkube, async).

Functions take and return plain dicts (the manifests' shape), so the rest of the operator
never sees a client model. Errors are not swallowed: `ApiError` and transport errors
propagate, and `reconcile.errors.classified` tells the reconcile steps whether a retry can help.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import ConfigMap, Node, Pod, Secret, Service
from lightkube.resources.discovery_v1 import EndpointSlice
from lightkube.resources.networking_v1 import NetworkPolicy
from lightkube.types import PatchType

FIELD_MANAGER = "llmpipe-operator"
LABEL_PIPELINE = "llmpipe.io/pipeline"

LLMPipeline = create_namespaced_resource(
    "llmpipe.io", "v1alpha1", "LLMPipeline", "llmpipelines", verbs=None
)

# The kinds the operator writes, in the order a pipeline's objects are deleted. Secrets (the
# stages' certificates) are written but never listed: the garbage collector removes them
# with their owners, so the operator needs no list or delete on Secrets.
_KINDS: Mapping[str, Any] = {
    "Deployment": Deployment,
    "Service": Service,
    "ConfigMap": ConfigMap,
    "Secret": Secret,
    "NetworkPolicy": NetworkPolicy,
}


def make_client() -> AsyncClient:
    """From $KUBECONFIG / ~/.kube/config, or the in-cluster ServiceAccount."""
    return AsyncClient(field_manager=FIELD_MANAGER)


async def list_nodes(client: AsyncClient) -> list[dict[str, Any]]:
    return [node.to_dict() async for node in client.list(Node)]


async def patch_node_annotations(
    client: AsyncClient, *, name: str, annotations: Mapping[str, str]
) -> None:
    """JSON merge patch of a Node's annotations (the node probe's `llmpipe.io/measured`
    and `llmpipe.io/links`; RBAC grants node patch only when the probe is enabled)."""
    await client.patch(
        Node, name, {"metadata": {"annotations": dict(annotations)}}, patch_type=PatchType.MERGE
    )


async def list_labelled_pods(
    client: AsyncClient, *, namespace: str, labels: Mapping[str, str]
) -> list[dict[str, Any]]:
    """Pods in `namespace` carrying `labels` (the node probes of the operator's release)."""
    return [
        dict(p.to_dict()) async for p in client.list(Pod, namespace=namespace, labels=dict(labels))
    ]


async def get_pipeline(client: AsyncClient, *, namespace: str, name: str) -> dict[str, Any] | None:
    """The pipeline as stored now (None once deleted)."""
    try:
        obj = await client.get(LLMPipeline, name, namespace=namespace)
    except ApiError as error:
        if error.status.code == 404:
            return None
        raise
    return dict(obj.to_dict())  # type: ignore[no-untyped-call]


async def list_pipelines(client: AsyncClient, *, namespace: str | None) -> list[dict[str, Any]]:
    """Every pipeline in `namespace` (None: all namespaces the client may list)."""
    ns = "*" if namespace is None else namespace
    return [
        dict(p.to_dict())  # type: ignore[no-untyped-call]
        async for p in client.list(LLMPipeline, namespace=ns)
    ]


async def patch_status(
    client: AsyncClient, *, namespace: str, name: str, status: Mapping[str, Any]
) -> None:
    """JSON merge patch of `.status` (None values delete fields) via the status subresource."""
    await client.patch(
        LLMPipeline.Status,
        name,
        {"status": dict(status)},
        namespace=namespace,
        patch_type=PatchType.MERGE,
    )


async def apply_objects(client: AsyncClient, objects: Iterable[Mapping[str, Any]]) -> None:
    """Server-side apply, in order, as field manager `llmpipe-operator` (forcing ownership:
    the operator is the only writer of its children)."""
    for obj in objects:
        meta = obj["metadata"]
        await client.patch(
            _KINDS[obj["kind"]],
            meta["name"],
            dict(obj),
            namespace=meta["namespace"],
            patch_type=PatchType.APPLY,
            field_manager=FIELD_MANAGER,
            force=True,
        )


async def get_service(client: AsyncClient, *, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        obj = await client.get(Service, name, namespace=namespace)
    except ApiError as error:
        if error.status.code == 404:
            return None
        raise
    return dict(obj.to_dict())


async def get_configmap(client: AsyncClient, *, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        obj = await client.get(ConfigMap, name, namespace=namespace)
    except ApiError as error:
        if error.status.code == 404:
            return None
        raise
    return dict(obj.to_dict())


async def get_secret(client: AsyncClient, *, namespace: str, name: str) -> dict[str, Any] | None:
    """One Secret by name (`data` values base64 as stored); None if there is none."""
    try:
        obj = await client.get(Secret, name, namespace=namespace)
    except ApiError as error:
        if error.status.code == 404:
            return None
        raise
    return dict(obj.to_dict())


async def list_children(
    client: AsyncClient,
    *,
    namespace: str,
    pipeline: str,
    kinds: Sequence[str] = ("Deployment", "Service", "ConfigMap"),
) -> list[dict[str, Any]]:
    """Objects labelled `llmpipe.io/pipeline=<pipeline>` of the given kinds."""
    found: list[dict[str, Any]] = []
    for kind in kinds:
        async for obj in client.list(
            _KINDS[kind], namespace=namespace, labels={LABEL_PIPELINE: pipeline}
        ):
            data = dict(obj.to_dict())
            data["kind"] = kind
            found.append(data)
    return found


async def list_pods(client: AsyncClient, *, namespace: str, pipeline: str) -> list[dict[str, Any]]:
    return [
        dict(p.to_dict())
        async for p in client.list(Pod, namespace=namespace, labels={LABEL_PIPELINE: pipeline})
    ]


async def list_all_pods(client: AsyncClient) -> list[dict[str, Any]]:
    """Every pod in every namespace: what is bound (or pinned) to each node, and its
    memory requests, which the planner subtracts from the node's allocatable memory."""
    return [dict(p.to_dict()) async for p in client.list(Pod, namespace="*")]


async def list_endpoint_slices(
    client: AsyncClient, *, namespace: str, service: str
) -> list[dict[str, Any]]:
    """The EndpointSlices the endpoint controller keeps for `service`."""
    return [
        dict(s.to_dict())
        async for s in client.list(
            EndpointSlice, namespace=namespace, labels={"kubernetes.io/service-name": service}
        )
    ]


async def delete_objects(client: AsyncClient, objects: Iterable[Mapping[str, Any]]) -> None:
    """Delete in the given order; an object already gone is fine."""
    for obj in objects:
        meta = obj["metadata"]
        try:
            await client.delete(_KINDS[obj["kind"]], meta["name"], namespace=meta["namespace"])
        except ApiError as error:
            if error.status.code != 404:
                raise
