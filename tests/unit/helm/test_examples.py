"""The example manifests and node descriptions are usable as shipped.

Covers: every examples/pipelines/*.yaml is one LLMPipeline that the operator's own spec parser
accepts (the API server's validation of the same files is in tests/cluster/helm); the four
scenarios say what their comments promise (privacy: stage 0 on edge; edge-only: edge nodes
only; cloud: throughput; draft: its draft model planned on an edge stage 0); the node
label script and the cluster file describe the same nodes with the same figures; and,
once the planner is there, each example plans on the example cluster.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmpipe_operator import spec as pipeline_spec
from llmpipe_operator.planning import inventory
from tests.unit.helm.conftest import ROOT

PIPELINES = sorted((ROOT / "examples" / "pipelines").glob("*.yaml"))
NODES = ROOT / "examples" / "nodes"
LABEL_KEYS = {
    "llmpipe.io/tflops": "tflops",
    "llmpipe.io/memory-bandwidth-gbps": "memoryBandwidthGBps",
    "llmpipe.io/uplink-mbps": "uplinkMbps",
}
examples = pytest.mark.parametrize("path", PIPELINES, ids=[p.stem for p in PIPELINES])


def _load(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "examples" / "pipelines" / name).read_text())


def test_the_four_scenarios_are_there() -> None:
    assert {p.name for p in PIPELINES} == {
        "edge-cloud-privacy.yaml",
        "edge-only.yaml",
        "cloud-throughput.yaml",
        "edge-draft-speculation.yaml",
    }


def test_draft_example_plans_its_draft_model_on_the_edge_stage_0() -> None:
    from llmpipe_operator.planning import planner

    parsed = pipeline_spec.parse_spec(_load("edge-draft-speculation.yaml")["spec"])
    assert parsed.workload.speculation == "draft" and parsed.model.draft is not None
    workload = planner.Workload(
        objective=parsed.workload.objective,
        max_sequences=parsed.workload.max_sequences,
        max_context_tokens=parsed.workload.max_context_tokens,
        dtype=parsed.model.dtype,
    )
    drafted = planner.with_draft(workload, parsed.draft_profile())
    placement = planner.Placement(first_stage="edge")
    cluster = inventory.parse_cluster(_cluster())
    plan = planner.plan_pipeline(parsed.profile(), cluster, workload=drafted, placement=placement)
    first = plan.stages[0]
    assert cluster.node(first.node).tier == "edge"
    assert first.draft_memory_bytes == drafted.first_stage_bytes > 2 * 2**30
    assert first.memory_bytes <= cluster.node(first.node).memory_bytes


@examples
def test_example_is_one_llmpipeline_the_operator_parses(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert len(docs) == 1
    (doc,) = docs
    assert doc["apiVersion"] == "llmpipe.io/v1alpha1" and doc["kind"] == "LLMPipeline"
    assert "namespace" not in doc["metadata"], "examples go to the namespace kubectl uses"
    parsed = pipeline_spec.parse_spec(doc["spec"])
    assert parsed.model.config["num_hidden_layers"] == parsed.profile().num_layers


def test_privacy_example_keeps_stage_zero_on_the_edge() -> None:
    parsed = pipeline_spec.parse_spec(_load("edge-cloud-privacy.yaml")["spec"])
    assert parsed.placement.first_stage == "edge"
    assert not parsed.placement.node_selector  # edge and cloud nodes are both candidates


def test_edge_only_example_selects_edge_nodes_at_both_ends() -> None:
    parsed = pipeline_spec.parse_spec(_load("edge-only.yaml")["spec"])
    assert parsed.placement.node_selector == {"llmpipe.io/tier": "edge"}
    assert (parsed.placement.first_stage, parsed.placement.last_stage) == ("edge", "edge")


def test_cloud_example_optimises_throughput_on_cloud_nodes() -> None:
    parsed = pipeline_spec.parse_spec(_load("cloud-throughput.yaml")["spec"])
    assert parsed.placement.node_selector == {"llmpipe.io/tier": "cloud"}
    assert parsed.workload.objective == "throughput"
    assert parsed.workload.max_sequences >= 8


def test_cloud_example_runs_on_the_example_gpus() -> None:
    """GPU stages on the L4 nodes: GPU memory budgets, one GPU per stage, the nvidia
    RuntimeClass, the GPU taint tolerated, the CUDA image."""
    from llmpipe_operator.planning import planner

    parsed = pipeline_spec.parse_spec(_load("cloud-throughput.yaml")["spec"])
    assert parsed.runtime.device == "cuda" and parsed.runtime.runtime_class_name == "nvidia"
    assert parsed.runtime.image is not None and parsed.runtime.image.endswith("-cu128")
    assert any(t.key == "nvidia.com/gpu" for t in parsed.placement.tolerations)
    cluster = inventory.parse_cluster(_cluster())
    gpus = [n for n in cluster.nodes if n.gpu is not None]
    assert {n.name for n in gpus} == {"gpu-1", "gpu-2"}
    assert all(n.gpu is not None and n.gpu.memory_bytes == 23034 * 2**20 for n in gpus)
    plan = planner.plan_pipeline(
        parsed.profile(),
        cluster,
        workload=planner.Workload(
            objective=parsed.workload.objective,
            max_sequences=parsed.workload.max_sequences,
            max_context_tokens=parsed.workload.max_context_tokens,
            device=parsed.runtime.device,
        ),
    )
    for stage in plan.stages:
        assert (stage.node.startswith("gpu-"), stage.device, stage.gpus) == (True, "cuda", 1)
        assert stage.memory_bytes <= 23034 * 2**20
        assert stage.host_bytes == parsed.runtime.runtime_overhead_bytes


def _cluster() -> dict[str, Any]:
    return yaml.safe_load((NODES / "k3s-edge-cloud.cluster.yaml").read_text())


def _script_labels() -> dict[str, dict[str, str]]:
    """node -> {label: value} from the `label <node> k=v ...` lines of the script."""
    text = (NODES / "label-k3s-edge-cloud.sh").read_text().replace("\\\n", " ")
    labels: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if len(words) > 2 and words[0] == "label":
            labels[words[1]] = dict(w.split("=", 1) for w in words[2:])
    return labels


def _script_links() -> dict[str, dict[str, Any]]:
    text = (NODES / "label-k3s-edge-cloud.sh").read_text()
    links = {}
    for node, value in re.findall(
        r"annotate node (\S+) --overwrite \\\n\s+'llmpipe\.io/links=(.*)'", text
    ):
        links[node] = yaml.safe_load(value)
    return links


def test_cluster_file_parses() -> None:
    parsed = inventory.parse_cluster(_cluster())
    assert {n.name for n in parsed.nodes} == {"jetson-1", "jetson-2", "gpu-1", "gpu-2"}


def test_label_script_and_cluster_file_agree() -> None:
    labels = _script_labels()
    nodes = {n["name"]: n for n in _cluster()["nodes"]}
    assert set(labels) == set(nodes)
    for name, node in nodes.items():
        assert labels[name]["llmpipe.io/tier"] == node["tier"]
        for label, field in LABEL_KEYS.items():
            assert float(labels[name][label]) == float(node[field]), (name, label)


def test_link_annotations_and_cluster_file_agree() -> None:
    from_script = {
        frozenset((node, peer)): (facts["mbps"], facts["rttMs"])
        for node, peers in _script_links().items()
        for peer, facts in peers.items()
    }
    from_file = {
        frozenset((link["a"], link["b"])): (link["mbps"], link["rttMs"])
        for link in _cluster()["links"]
    }
    assert from_script == from_file


PLANNER_LANDED = importlib.util.find_spec("llmpipe_operator.planning.planner") is not None


@pytest.mark.skipif(not PLANNER_LANDED, reason="llmpipe_operator.planning.planner not there yet")
@examples
def test_example_plans_on_the_example_cluster(path: Path) -> None:
    from llmpipe_operator.planning import planner

    parsed = pipeline_spec.parse_spec(yaml.safe_load(path.read_text())["spec"])
    cluster = _cluster()
    wanted = parsed.placement.node_selector.get("llmpipe.io/tier")
    cluster["nodes"] = [n for n in cluster["nodes"] if wanted in (None, n["tier"])]
    names = {n["name"] for n in cluster["nodes"]}
    cluster["links"] = [k for k in cluster["links"] if {k["a"], k["b"]} <= names]
    plan = planner.plan_pipeline(
        parsed.profile(),
        inventory.parse_cluster(cluster),
        workload=planner.Workload(
            objective=parsed.workload.objective,
            max_sequences=parsed.workload.max_sequences,
            max_context_tokens=parsed.workload.max_context_tokens,
            runtime_overhead_bytes=parsed.runtime.runtime_overhead_bytes,
            device=parsed.runtime.device,
            dtype=parsed.model.dtype,
        ),
        placement=planner.Placement(
            first_stage=parsed.placement.first_stage,
            last_stage=parsed.placement.last_stage,
            max_stages=parsed.placement.max_stages,
        ),
    )
    stages = plan.to_dict()["stages"]
    assert stages[0]["layerStart"] == 0
    assert stages[-1]["layerEnd"] == parsed.profile().num_layers
    if parsed.placement.first_stage == "edge":
        assert stages[0]["node"].startswith("jetson-")
