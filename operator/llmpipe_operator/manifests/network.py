"""Builder for a pipeline's NetworkPolicy: who may connect to its stage pods. Pure.

One NetworkPolicy per pipeline (not per plan: it selects every plan's stage pods by the
pipeline label, so it stays in place across switches), ingress only:
- the gRPC port only from the pipeline's own stage pods (hidden states, token ids);
- the HTTP port (OpenAI API on stage 0; health and metrics on every stage) from the peers
  `spec.service.allowFrom` names, by default the pods of the pipeline's namespace, and,
  when the operator's namespace is known, from the operator's pods there (it reads every
  stage's /metrics into status.measured, `reconcile.measure`).
Egress is left open: stages call their neighbours, DNS and, for Hub sources, the Hub.
Kubelet probes come from the node, which common CNIs let through whatever the policy says.
A NetworkPolicy needs a CNI that enforces it (Calico, Cilium, K3s' default flannel with its
network-policy controller); without one it is inert (docs/security.md).
"""

from __future__ import annotations

from typing import Any

from llmpipe_operator import spec as spec_mod
from llmpipe_operator.manifests import names

OPERATOR_POD_LABELS = {
    "app.kubernetes.io/component": "operator",
    "app.kubernetes.io/part-of": "llmpipe",
}
"""Labels the chart puts on the operator's pod (`llmpipe.labels`)."""


def build_network_policy(
    pipeline: names.PipelineRef,
    spec: spec_mod.PipelineSpec,
    *,
    operator_namespace: str | None = None,
) -> dict[str, Any]:
    stage_pods = {"matchLabels": names.stage_pods_selector(pipeline)}
    http_from = [dict(peer) for peer in spec.service.allow_from] or [{"podSelector": {}}]
    if operator_namespace is not None:
        http_from.append(
            {
                "namespaceSelector": {
                    "matchLabels": {"kubernetes.io/metadata.name": operator_namespace}
                },
                "podSelector": {"matchLabels": dict(OPERATOR_POD_LABELS)},
            }
        )
    labels = {**names.pipeline_labels(pipeline), names.LABEL_COMPONENT: "network"}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": names.metadata(pipeline, names.network_policy_name(pipeline), labels),
        "spec": {
            "podSelector": stage_pods,
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"podSelector": stage_pods}],
                    "ports": [{"protocol": "TCP", "port": names.GRPC_PORT}],
                },
                {
                    "from": http_from,
                    "ports": [{"protocol": "TCP", "port": names.HTTP_PORT}],
                },
            ],
        },
    }
