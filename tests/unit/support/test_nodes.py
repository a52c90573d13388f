"""Cluster file -> simulated Node manifests (tests/support/nodes.py), and the clear error
when the control-plane binaries are missing. Pure: no cluster.

Covers: the llmpipe labels and the K3s edge role, capacity = allocatable from the file's
memory, the symmetric `llmpipe.io/links` annotation, extra labels, and errors that name
the node and field.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.support import control_plane, nodes

SMALL = Path(__file__).resolve().parents[2] / "support" / "clusters" / "small.yaml"


def small_cluster() -> list[nodes.NodeSpec]:
    return nodes.parse_cluster(yaml.safe_load(SMALL.read_text()))


def test_edge_node_manifest_has_llmpipe_labels_and_edge_role() -> None:
    edge = nodes.node_manifest(small_cluster()[0])
    labels = edge["metadata"]["labels"]
    assert labels["llmpipe.io/tier"] == "edge"
    assert labels["llmpipe.io/tflops"] == "1.3"
    assert labels["llmpipe.io/memory-bandwidth-gbps"] == "60"
    assert labels["llmpipe.io/uplink-mbps"] == "100"
    assert labels["kubernetes.io/hostname"] == "cp-edge-1"
    assert labels["node-role.kubernetes.io/edge"] == "true"
    assert labels["topology.kubernetes.io/zone"] == "shop-floor"
    assert edge["metadata"]["annotations"][nodes.KWOK_ANNOTATION] == "fake"


def test_cloud_node_has_no_edge_role_and_more_cpu() -> None:
    cloud = nodes.node_manifest(small_cluster()[2])
    assert "node-role.kubernetes.io/edge" not in cloud["metadata"]["labels"]
    assert cloud["status"]["capacity"] == {"cpu": "16", "memory": "64Gi", "pods": "110"}
    assert cloud["status"]["allocatable"] == cloud["status"]["capacity"]


def test_links_annotation_is_symmetric_and_only_on_linked_nodes() -> None:
    edge1, edge2, cloud = (nodes.node_manifest(spec) for spec in small_cluster())
    assert json.loads(edge1["metadata"]["annotations"][nodes.LINKS_ANNOTATION]) == {
        "cp-cloud-1": {"mbps": 40.0, "rttMs": 35.0}
    }
    assert json.loads(cloud["metadata"]["annotations"][nodes.LINKS_ANNOTATION]) == {
        "cp-edge-1": {"mbps": 40.0, "rttMs": 35.0}
    }
    assert nodes.LINKS_ANNOTATION not in edge2["metadata"]["annotations"]


def test_memory_given_in_bytes_is_kept_as_a_quantity() -> None:
    spec = nodes.parse_node({"name": "n", "memory": 8589934592})
    assert nodes.node_manifest(spec)["status"]["capacity"]["memory"] == "8589934592"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"nodes": []}, "non-empty `nodes`"),
        ({"nodes": [{"name": "a", "memory": "1Gi", "tier": "fog"}]}, "node 'a': tier"),
        ({"nodes": [{"name": "a", "memory": "1Gi", "tflops": -1}]}, "node 'a': tflops"),
        ({"nodes": [{"name": "a"}]}, "node 'a': memory"),
        ({"nodes": [{"name": "a", "memory": "1Gi"}] * 2}, "unique"),
        ({"nodes": [{"name": "a", "memory": "1Gi"}], "links": [{"a": "a", "b": "x"}]}, "link"),
    ],
)
def test_bad_cluster_files_are_refused_with_the_culprit_named(data: dict, message: str) -> None:
    with pytest.raises(nodes.ClusterFileError, match=message):
        nodes.parse_cluster(data)


def test_missing_binaries_give_instructions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etcd").write_text("#!/bin/sh\n")
    (tmp_path / "etcd").chmod(0o755)
    monkeypatch.setenv("LLMPIPE_K8S_BIN", str(tmp_path))
    with pytest.raises(control_plane.MissingBinaries, match="lacks kube-apiserver") as error:
        control_plane.find_bin_dir()
    assert "scripts/build-k8s-tools" in str(error.value)


@pytest.mark.parametrize(
    "path",
    sorted((Path(__file__).resolve().parents[3] / "examples" / "clusters").glob("*.yaml")),
    ids=lambda path: path.name,
)
def test_example_cluster_files_become_nodes(path: Path) -> None:
    data = yaml.safe_load(path.read_text())
    manifests = [nodes.node_manifest(spec) for spec in nodes.parse_cluster(data)]
    assert [m["metadata"]["name"] for m in manifests] == [n["name"] for n in data["nodes"]]
    for manifest, raw in zip(manifests, data["nodes"], strict=True):
        assert manifest["metadata"]["labels"]["llmpipe.io/tier"] == raw["tier"]
        assert manifest["status"]["allocatable"]["memory"] == str(raw["memory"])


def test_cli_up_refuses_a_directory_that_is_not_its_own(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("precious")
    assert control_plane.main(["up", "--dir", str(tmp_path)]) == 1
    assert "refusing to reuse it" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "precious"


def test_cli_env_and_down_without_a_plane(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert control_plane.main(["env", "--dir", str(tmp_path)]) == 1
    assert "not up" in capsys.readouterr().err
    assert control_plane.main(["down", "--dir", str(tmp_path)]) == 0
