"""The pipeline's NetworkPolicy (manifests/network.py).

Covers: it selects every stage pod of the pipeline whatever the plan (and nothing else);
the gRPC port admits only those stage pods; the HTTP port admits the pipeline's namespace by
default and exactly the `spec.service.allowFrom` peers when set; ingress only; owned by the
pipeline, not labelled with a plan hash (so removing an old plan never removes it); with the
operator's namespace known, the HTTP port also admits the operator's pods there (and only
there), next to the default or the allowFrom peers.
"""

from __future__ import annotations

from llmpipe_operator.manifests import names, network, render
from tests.unit.manifests.builders import REF, a_plan, a_spec

STAGE_PODS = {"matchLabels": {names.LABEL_PIPELINE: "chat", names.LABEL_COMPONENT: "stage"}}


def by_port(policy: dict) -> dict[int, list[dict]]:
    return {rule["ports"][0]["port"]: rule["from"] for rule in policy["spec"]["ingress"]}


def test_grpc_only_from_the_pipelines_stage_pods_http_from_the_namespace() -> None:
    policy = network.build_network_policy(REF, a_spec().build())
    assert policy["kind"] == "NetworkPolicy" and policy["apiVersion"] == "networking.k8s.io/v1"
    assert policy["metadata"]["name"] == "chat-network"
    assert policy["metadata"]["namespace"] == "team-a"
    assert policy["spec"]["podSelector"] == STAGE_PODS
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert by_port(policy) == {
        names.GRPC_PORT: [{"podSelector": STAGE_PODS}],
        names.HTTP_PORT: [{"podSelector": {}}],
    }
    assert all(r["ports"][0]["protocol"] == "TCP" for r in policy["spec"]["ingress"])


def test_allow_from_replaces_the_namespace_default_for_http_only() -> None:
    peers = [
        {"namespaceSelector": {"matchLabels": {"team": "web"}}},
        {"ipBlock": {"cidr": "10.0.0.0/8"}},
    ]
    policy = network.build_network_policy(REF, a_spec().service(allowFrom=peers).build())
    assert by_port(policy)[names.HTTP_PORT] == peers
    assert by_port(policy)[names.GRPC_PORT] == [{"podSelector": STAGE_PODS}]


def test_the_selector_matches_every_plans_stage_pods_and_not_the_endpoint() -> None:
    spec = a_spec().build()
    plan = a_plan(spec)
    assert len(plan["stages"]) > 1
    objects = render.render_plan(REF, spec, plan, digest="abcd1234")
    selector = network.build_network_policy(REF, spec)["spec"]["podSelector"]["matchLabels"]
    pods = [
        o["spec"]["template"]["metadata"]["labels"] for o in objects if o["kind"] == "Deployment"
    ]
    assert pods and all(selector.items() <= labels.items() for labels in pods)
    other = names.PipelineRef(name="other", namespace="team-a", uid="u2")
    assert network.build_network_policy(other, spec)["spec"]["podSelector"] != {
        "matchLabels": selector
    }


def test_owned_by_the_pipeline_and_not_by_a_plan() -> None:
    policy = network.build_network_policy(REF, a_spec().build())
    assert policy["metadata"]["ownerReferences"] == [names.owner_reference(REF)]
    assert names.LABEL_PLAN_HASH not in policy["metadata"]["labels"]


def test_the_operator_reads_the_stages_http_port_from_its_own_namespace_only() -> None:
    operator_peer = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "llmpipe-system"}},
        "podSelector": {"matchLabels": network.OPERATOR_POD_LABELS},
    }
    default = network.build_network_policy(
        REF, a_spec().build(), operator_namespace="llmpipe-system"
    )
    assert by_port(default)[names.HTTP_PORT] == [{"podSelector": {}}, operator_peer]
    assert by_port(default)[names.GRPC_PORT] == [{"podSelector": STAGE_PODS}]
    peers = [{"ipBlock": {"cidr": "10.0.0.0/8"}}]
    narrowed = network.build_network_policy(
        REF, a_spec().service(allowFrom=peers).build(), operator_namespace="llmpipe-system"
    )
    assert by_port(narrowed)[names.HTTP_PORT] == [*peers, operator_peer]
