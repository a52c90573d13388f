"""Operator benchmarks on the simulated cluster (prints figures; asserts nothing about speed).

1. apply -> all stage pods Running (and status Ready): one pipeline on 4 kwok nodes,
   repeated; median, min and max.
2. Operator resident memory (VmRSS) with 200 simulated nodes and 20 pipelines, all Ready,
   next to the same process's RSS right after start (no nodes, no pipelines).

    PYTHONPATH=operator:. python bench/operator_cluster.py [--runs 5] [--nodes 200] [--pipelines 20]

Needs the control-plane binaries (scripts/build-k8s-tools); starts its own control plane
in a temporary directory and stops it at the end.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from lightkube import Client
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.core_v1 import Pod

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.cluster.operator.conftest import (  # noqa: E402
    OperatorProcess,
    pipeline_manifest,
    start_operator,
    stop_operator,
)
from tests.support import control_plane as cp  # noqa: E402
from tests.support import nodes, wait  # noqa: E402

LLMPipeline = create_namespaced_resource("llmpipe.io", "v1alpha1", "LLMPipeline", "llmpipelines")


def apply(plane: cp.ControlPlane, namespace: str, manifest: dict[str, Any]) -> None:
    subprocess.run(
        [str(plane.bin_dir / "kubectl"), "apply", "-n", namespace, "-f", "-"],
        input=yaml.safe_dump(manifest),
        env=plane.env,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )


def all_running(client: Client, namespace: str, name: str) -> bool:
    obj = client.get(LLMPipeline, name, namespace=namespace).to_dict()
    st = obj.get("status") or {}
    digest, count = st.get("planHash"), st.get("stageCount")
    if not digest or not count:
        return False
    pods = list(
        client.list(
            Pod,
            namespace=namespace,
            labels={"llmpipe.io/pipeline": name, "llmpipe.io/plan-hash": digest},
        )
    )
    return len(pods) == count and all(p.status.phase == "Running" for p in pods)


def is_ready(client: Client, namespace: str, name: str) -> bool:
    st = client.get(LLMPipeline, name, namespace=namespace).to_dict().get("status") or {}
    return st.get("phase") == "Ready"


def add_pool(plane: cp.ControlPlane, pool: str, count: int) -> None:
    specs = []
    for i in range(count):
        edge = i % 3 != 2
        specs.append(
            nodes.NodeSpec(
                name=f"{pool}-n{i}",
                tier="edge" if edge else "cloud",
                memory="400Mi" if edge else "2Gi",
                tflops=1.0 if edge else 20.0,
                uplink_mbps=300 if edge else 1000,
                labels={"bench.llmpipe.io/pool": pool},
            )
        )
    for spec in specs:
        plane.add_node(spec, wait_ready=False)
    for spec in specs:
        wait.node_condition(plane.client(), spec.name, status="True", timeout=120)


def bench_apply_to_running(
    plane: cp.ControlPlane, operator: OperatorProcess, namespace: str, runs: int
) -> None:
    client = plane.client()
    add_pool(plane, "latency", 4)
    running, ready = [], []
    for run in range(runs):
        name = f"run{run}"
        manifest = pipeline_manifest(
            name, selector={"bench.llmpipe.io/pool": "latency"}, placement={"firstStage": "edge"}
        )
        started = time.monotonic()
        apply(plane, namespace, manifest)
        wait.until(
            lambda n=name: all_running(client, namespace, n),
            what=f"{name} Running",
            timeout=120,
            interval=0.05,
            seen=operator.log_tail,
        )
        running.append(time.monotonic() - started)
        wait.until(
            lambda n=name: is_ready(client, namespace, n),
            what=f"{name} Ready",
            timeout=120,
            interval=0.05,
            seen=operator.log_tail,
        )
        ready.append(time.monotonic() - started)
        client.delete(LLMPipeline, name, namespace=namespace)
        wait.until(
            lambda n=name: (
                not list(client.list(Pod, namespace=namespace, labels={"llmpipe.io/pipeline": n}))
            ),
            what="pods gone",
            timeout=120,
        )
    print(
        f"apply -> all stage pods Running ({runs} runs, 4 nodes): median "
        f"{statistics.median(running):.2f}s, min {min(running):.2f}s, max {max(running):.2f}s"
    )
    print(
        f"apply -> status Ready:                          median "
        f"{statistics.median(ready):.2f}s, min {min(ready):.2f}s, max {max(ready):.2f}s"
    )


def bench_memory(
    plane: cp.ControlPlane,
    operator: OperatorProcess,
    namespace: str,
    *,
    node_count: int,
    pipelines: int,
) -> None:
    client = plane.client()
    per_pool = node_count // pipelines
    started = time.monotonic()
    for p in range(pipelines):
        add_pool(plane, f"pool{p}", per_pool)
    print(f"{per_pool * pipelines} nodes Ready in {time.monotonic() - started:.1f}s")
    started = time.monotonic()
    for p in range(pipelines):
        apply(
            plane,
            namespace,
            pipeline_manifest(
                f"pipe{p}",
                selector={"bench.llmpipe.io/pool": f"pool{p}"},
                placement={"firstStage": "edge"},
            ),
        )
    for p in range(pipelines):
        wait.until(
            lambda n=f"pipe{p}": is_ready(client, namespace, n),
            what=f"pipe{p} Ready",
            timeout=600,
            interval=0.5,
            seen=operator.log_tail,
        )
    print(
        f"{pipelines} pipelines Ready in {time.monotonic() - started:.1f}s "
        f"({per_pool} eligible nodes each)"
    )
    time.sleep(5)  # let the safety-net timers run once more before measuring
    print(
        f"operator RSS with {per_pool * pipelines} nodes and {pipelines} pipelines: "
        f"{operator.rss_bytes() / 2**20:.1f} MiB"
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--pipelines", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, cp.running(Path(tmp) / "cp") as plane:
        plane.kubectl("apply", "--server-side", "-f", str(REPO / "crds" / "llmpipeline.yaml"))
        plane.kubectl(
            "wait", "--for=condition=Established", "--timeout=60s", "crd/llmpipelines.llmpipe.io"
        )
        namespace = "bench"
        plane.create_namespace(namespace)
        workdir = Path(tmp) / "operator"
        workdir.mkdir()
        operator = start_operator(plane, namespace=namespace, workdir=workdir)
        try:
            time.sleep(2)
            print(
                f"operator RSS at start (no nodes, no pipelines): "
                f"{operator.rss_bytes() / 2**20:.1f} MiB"
            )
            bench_apply_to_running(plane, operator, namespace, args.runs)
            bench_memory(
                plane, operator, namespace, node_count=args.nodes, pipelines=args.pipelines
            )
        finally:
            stop_operator(plane, operator)
    return 0


if __name__ == "__main__":
    sys.exit(main())
