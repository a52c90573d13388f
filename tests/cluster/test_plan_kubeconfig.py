"""`llmpipe plan --kubeconfig`: a plan made on a real API server's Nodes, as the operator
reads them, equals the plan made on the cluster file those Nodes were registered from; a
node whose compute label is gone is planned with its measured figure
(`llmpipe.io/measured`), as the operator would. Read only: nothing is created.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import yaml
from lightkube.resources.core_v1 import Node
from lightkube.types import PatchType

from llmpipe_cli import plan as plan_cli
from tests.cluster.conftest import SMALL_CLUSTER
from tests.support import control_plane as cp

MODEL = Path(__file__).resolve().parents[2] / "examples" / "models" / "Llama-2-7B" / "config.json"


def plan_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    code = plan_cli.main(["plan", "--model", str(MODEL), "-o", "json", *args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


@pytest.fixture
def registered(control_plane: cp.ControlPlane, tmp_path: Path) -> tuple[Path, str]:
    """(a cluster file, a label only its nodes carry), its nodes added to the cluster."""
    tag = uuid.uuid4().hex[:6]
    data = yaml.safe_load(SMALL_CLUSTER.read_text())
    for node in data["nodes"]:
        node["name"] = f"{tag}-{node['name']}"
        node.setdefault("labels", {})["test.llmpipe.io/what-if"] = tag
    for link in data.get("links") or []:
        link["a"], link["b"] = f"{tag}-{link['a']}", f"{tag}-{link['b']}"
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    control_plane.add_nodes_from_file(path)
    yield path, tag
    for node in data["nodes"]:
        control_plane.remove_node(node["name"])


def test_live_plan_equals_the_file_plan(
    control_plane: cp.ControlPlane, registered, capsys: pytest.CaptureFixture[str]
) -> None:
    path, tag = registered
    live = plan_json(
        capsys,
        "--kubeconfig",
        str(control_plane.kubeconfig),
        "--selector",
        f"test.llmpipe.io/what-if={tag}",
    )
    assert live == plan_json(capsys, "--cluster", str(path))
    assert {s["node"] for s in live["stages"]} <= {
        f"{tag}-{n}" for n in ("cp-edge-1", "cp-edge-2", "cp-cloud-1")
    }


def test_a_measured_figure_fills_a_missing_label(
    control_plane: cp.ControlPlane, registered, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path, tag = registered
    cloud = f"{tag}-cp-cloud-1"
    measured = {"version": 1, "probeVersion": "1", "tflops": 0.2, "memoryBandwidthGBps": 900}
    control_plane.client().patch(
        Node,
        cloud,
        {
            "metadata": {
                "labels": {"llmpipe.io/tflops": None},
                "annotations": {"llmpipe.io/measured": json.dumps(measured)},
            }
        },
        patch_type=PatchType.MERGE,
    )
    data = yaml.safe_load(path.read_text())
    for node in data["nodes"]:
        if node["name"] == cloud:
            node["tflops"] = 0.2  # what the probe measured, as a file would say it
    slowed = tmp_path / "slowed.yaml"
    slowed.write_text(yaml.safe_dump(data))
    live = plan_json(
        capsys,
        "--kubeconfig",
        str(control_plane.kubeconfig),
        "--selector",
        f"test.llmpipe.io/what-if={tag}",
    )
    assert live == plan_json(capsys, "--cluster", str(slowed))
    assert live != plan_json(capsys, "--cluster", str(path))
