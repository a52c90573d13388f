"""Waiting for the cluster to reach a state, with timeouts and failure messages that say
what was awaited and what was last seen (never a bare "timed out").

Every helper polls the real API server through a lightkube Client; none sleeps blindly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from lightkube import ApiError, Client
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import Event, Node, Pod, ServiceAccount

T = TypeVar("T")

DEFAULT_TIMEOUT = 60.0
"""Generous: waits return as soon as the state is reached; the timeout only matters on a
loaded machine (CI, or several test sessions sharing 2 cores)."""


class WaitTimeout(AssertionError):
    """The awaited state did not come within the timeout (an assertion: the test fails)."""


def until(
    check: Callable[[], T | None],
    *,
    what: str,
    timeout: float = DEFAULT_TIMEOUT,
    interval: float = 0.2,
    seen: Callable[[], str] | None = None,
) -> T:
    """Call `check` until it returns something truthy and return that.

    `what` completes "timed out after Ns waiting for ..."; `seen` describes the last
    observed state for the message. An ApiError 404 from `check` counts as "not yet".
    """
    deadline = time.monotonic() + timeout
    last_error = ""
    while True:
        try:
            result = check()
        except ApiError as error:
            if error.status.code != 404:
                raise
            result, last_error = None, f"not found ({error.status.message})"
        if result:
            return result
        if time.monotonic() >= deadline:
            observed = seen() if seen is not None else last_error or "nothing useful"
            raise WaitTimeout(
                f"timed out after {timeout:.0f}s waiting for {what}; last seen: {observed}"
            )
        time.sleep(interval)


def _conditions(obj: Any) -> dict[str, str]:
    conditions = (obj.status.conditions if obj.status else None) or []
    return {c.type: c.status for c in conditions}


def _describe(get: Callable[[], Any], summarize: Callable[[Any], str]) -> Callable[[], str]:
    def describe() -> str:
        try:
            return summarize(get())
        except ApiError as error:
            return f"API error {error.status.code}: {error.status.message}"

    return describe


def pod_summary(pod: Pod) -> str:
    status = pod.status
    name = pod.metadata.name if pod.metadata else "?"
    if status is None:
        return f"pod {name}: no status"
    node = pod.spec.nodeName if pod.spec else None
    return (
        f"pod {name}: phase={status.phase} node={node} "
        f"podIP={status.podIP} conditions={_conditions(pod)}"
    )


def pod_running(
    client: Client, name: str, namespace: str, *, timeout: float = DEFAULT_TIMEOUT
) -> Pod:
    """Wait until the pod is Running and Ready, and return it."""

    def get() -> Pod:
        return client.get(Pod, name, namespace=namespace)

    def check() -> Pod | None:
        pod = get()
        ready = _conditions(pod).get("Ready") == "True"
        return pod if pod.status and pod.status.phase == "Running" and ready else None

    return until(
        check,
        what=f"pod {namespace}/{name} Running and Ready",
        timeout=timeout,
        seen=_describe(get, pod_summary),
    )


def pods(
    client: Client,
    namespace: str,
    *,
    labels: Mapping[str, str],
    count: int,
    predicate: Callable[[Pod], bool] = lambda pod: True,
    what: str = "pods",
    timeout: float = DEFAULT_TIMEOUT,
) -> list[Pod]:
    """Wait until exactly `count` pods with these labels satisfy `predicate`; return them."""

    def listed() -> list[Pod]:
        return list(client.list(Pod, namespace=namespace, labels=dict(labels)))

    def check() -> list[Pod] | None:
        matching = [pod for pod in listed() if predicate(pod)]
        return matching if len(matching) == count else None

    def seen() -> str:
        return "; ".join(pod_summary(pod) for pod in listed()) or "no pods"

    return until(
        check,
        what=f"{count} {what} with labels {labels} in {namespace}",
        timeout=timeout,
        seen=seen,
    )


def is_running(pod: Pod) -> bool:
    return bool(
        pod.status and pod.status.phase == "Running" and _conditions(pod).get("Ready") == "True"
    )


def deployment_available(
    client: Client, name: str, namespace: str, *, timeout: float = DEFAULT_TIMEOUT
) -> Deployment:
    """Wait until the Deployment's Available condition is True and all replicas are ready."""

    def get() -> Deployment:
        return client.get(Deployment, name, namespace=namespace)

    def check() -> Deployment | None:
        deployment = get()
        status = deployment.status
        wanted = deployment.spec.replicas if deployment.spec.replicas is not None else 1
        ok = (
            status is not None
            and _conditions(deployment).get("Available") == "True"
            and (status.readyReplicas or 0) == wanted
            and (status.updatedReplicas or 0) == wanted
        )
        return deployment if ok else None

    def summarize(deployment: Deployment) -> str:
        status = deployment.status
        if status is None:
            return "no status"
        return (
            f"replicas={status.replicas} ready={status.readyReplicas} "
            f"updated={status.updatedReplicas} conditions={_conditions(deployment)}"
        )

    return until(
        check,
        what=f"deployment {namespace}/{name} Available",
        timeout=timeout,
        seen=_describe(get, summarize),
    )


def node_condition(
    client: Client,
    name: str,
    *,
    condition: str = "Ready",
    status: str = "True",
    timeout: float = DEFAULT_TIMEOUT,
) -> Node:
    """Wait until the node's condition has the given status (e.g. Ready=False)."""

    def get() -> Node:
        return client.get(Node, name)

    def check() -> Node | None:
        node = get()
        return node if _conditions(node).get(condition) == status else None

    return until(
        check,
        what=f"node {name} {condition}={status}",
        timeout=timeout,
        seen=_describe(get, lambda node: f"conditions={_conditions(node)}"),
    )


NOT_READY_TAINTS = ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")


def node_ready(client: Client, name: str, *, timeout: float = DEFAULT_TIMEOUT) -> Node:
    """Wait until the node is Ready *and* schedulable for new pods: a new node carries the
    `node.kubernetes.io/not-ready` taint until the node lifecycle controller sees it Ready."""

    def get() -> Node:
        return client.get(Node, name)

    def check() -> Node | None:
        node = get()
        taints = [t.key for t in (node.spec.taints if node.spec else None) or []]
        ready = _conditions(node).get("Ready") == "True"
        return node if ready and not set(taints) & set(NOT_READY_TAINTS) else None

    def summarize(node: Node) -> str:
        taints = [t.key for t in (node.spec.taints if node.spec else None) or []]
        return f"conditions={_conditions(node)} taints={taints}"

    return until(
        check,
        what=f"node {name} Ready without not-ready taints",
        timeout=timeout,
        seen=_describe(get, summarize),
    )


def event(
    client: Client,
    namespace: str,
    *,
    involved: str,
    reason: str,
    timeout: float = DEFAULT_TIMEOUT,
) -> Event:
    """Wait for an Event with this reason about the named object; return the first one."""

    def listed() -> list[Event]:
        return [
            e for e in client.list(Event, namespace=namespace) if e.involvedObject.name == involved
        ]

    def check() -> Event | None:
        return next((e for e in listed() if e.reason == reason), None)

    def seen() -> str:
        return "; ".join(f"{e.reason}: {e.message}" for e in listed()) or "no events"

    return until(
        check, what=f"event {reason} about {namespace}/{involved}", timeout=timeout, seen=seen
    )


def deleted(
    client: Client,
    resource: Any,
    name: str,
    *,
    namespace: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> None:
    """Wait until the object is gone (404)."""

    def check() -> bool:
        try:
            client.get(resource, name, namespace=namespace)
        except ApiError as error:
            if error.status.code == 404:
                return True
            raise
        return False

    until(
        check,
        what=f"{resource.__name__} {namespace or ''}/{name} to be deleted",
        timeout=timeout,
        seen=lambda: "still present",
    )


def service_account(
    client: Client, namespace: str, name: str = "default", *, timeout: float = DEFAULT_TIMEOUT
) -> ServiceAccount:
    """Wait for a ServiceAccount; the controller manager creates `default` in new namespaces,
    and pods are refused by ServiceAccount admission until it exists."""
    return until(
        lambda: client.get(ServiceAccount, name, namespace=namespace),
        what=f"serviceaccount {namespace}/{name} (created by kube-controller-manager)",
        timeout=timeout,
    )
