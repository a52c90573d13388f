"""What the operator would plan on: the live inventory for `llmpipe plan --kubeconfig`.

Lists the Nodes, the Pods and (when served) metrics.k8s.io node usage through `k8s`, the
same calls the operator makes, and builds the inventory with the operator's own
`pipeline.Observed` (labels, measured facts, links, memory others hold), for a new
pipeline: none of its own pods count, and nothing is reserved for it. Read only.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from lightkube import AsyncClient, KubeConfig
from lightkube.core.exceptions import ConfigError

from llmpipe_operator.k8s import api, errors, metrics_api
from llmpipe_operator.planning import live
from llmpipe_operator.reconcile import pipeline

READ_ERRORS: tuple[type[Exception], ...] = (*errors.API_ERRORS, ConfigError)
"""What reading the cluster may raise: the API's errors, a kubeconfig lightkube refuses."""

NEW_PIPELINE: live.PipelineKey = ("", "")
"""No pipeline has this key, so every pod and stage on the nodes counts as someone else's."""


def client_for(kubeconfig: Path | None, context: str | None) -> AsyncClient:
    """A read client from a kubeconfig file (default: $KUBECONFIG, ~/.kube/config) and
    context (default: its current context)."""
    config = KubeConfig.from_file(kubeconfig) if kubeconfig else KubeConfig.from_env()
    single = config.get(context_name=context)
    if single is None:
        raise ValueError(f"kubeconfig has no context {context!r}")
    return AsyncClient(config=single, field_manager=api.FIELD_MANAGER)


async def observe(client: AsyncClient, eligibility: live.Eligibility) -> pipeline.Observed:
    nodes = await api.list_nodes(client)
    pods = await api.list_all_pods(client)
    usage = await metrics_api.read_node_usage(client)
    return pipeline.Observed(
        raw_nodes=nodes,
        pods=pods,
        owner=NEW_PIPELINE,
        eligibility=eligibility,
        memory_usage=dict(usage.memory_bytes),
        reservations={},
    )


def live_inventory(
    kubeconfig: Path | None, context: str | None, eligibility: live.Eligibility
) -> live.LiveInventory:
    """The inventory the operator would plan a new pipeline on, read once."""

    async def read() -> live.LiveInventory:
        client = client_for(kubeconfig, context)
        try:
            return (await observe(client, eligibility)).inventory()
        finally:
            await client.close()

    return asyncio.run(read())
