"""Control-plane benchmarks (prints figures; asserts nothing about speed).

1. Warm build check: `scripts/build-k8s-tools --env` with the binaries cached (median of N).
2. `up`: start etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok and
   add the 3 nodes of tests/support/clusters/small.yaml until all are Ready; per-component
   readiness and the total, repeated N times (median, min, max).
3. A 1-replica Deployment pinned to an edge node by required affinity: create -> Available.

    PYTHONPATH=. python bench/control_plane.py [--runs 3]

Needs the binaries (scripts/build-k8s-tools). The cold build time is printed by the build
script itself ("done in Ns") and recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lightkube.resources.apps_v1 import Deployment

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support import control_plane as cp  # noqa: E402
from tests.support import wait  # noqa: E402

SMALL = REPO / "tests" / "support" / "clusters" / "small.yaml"


def spread(values: list[float]) -> str:
    return (
        f"median {statistics.median(values):.2f}s  min {min(values):.2f}s  "
        f"max {max(values):.2f}s  (n={len(values)})"
    )


def warm_check(runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        began = time.monotonic()
        subprocess.run(
            [str(REPO / "scripts" / "build-k8s-tools"), "--env"],
            check=True,
            capture_output=True,
        )
        times.append(time.monotonic() - began)
    return times


def deployment_seconds(plane: cp.ControlPlane) -> float:
    client = plane.client()
    plane.create_namespace("bench")
    began = time.monotonic()
    client.create(
        Deployment.from_dict(
            {
                "metadata": {"name": "stage-0"},
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": {"app": "stage-0"}},
                    "template": {
                        "metadata": {"labels": {"app": "stage-0"}},
                        "spec": {
                            "nodeSelector": {"kubernetes.io/hostname": "cp-edge-1"},
                            "containers": [{"name": "main", "image": "registry.invalid/x:1"}],
                        },
                    },
                },
            }
        ),
        namespace="bench",
    )
    wait.deployment_available(client, "stage-0", "bench", timeout=60)
    return time.monotonic() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    print("== warm build check (scripts/build-k8s-tools --env, binaries cached)")
    print("  ", spread(warm_check(max(args.runs, 5))))

    print("== up: control plane + 3 simulated nodes Ready (tests/support/clusters/small.yaml)")
    totals: list[float] = []
    phases: dict[str, list[float]] = {}
    deployments: list[float] = []
    for run in range(args.runs):
        with (
            tempfile.TemporaryDirectory() as tmp,
            cp.running(Path(tmp) / "cp", cluster_file=SMALL) as plane,
        ):
            totals.append(plane.ready_seconds)
            for phase, seconds in plane.timings.items():
                phases.setdefault(phase, []).append(seconds)
            deployments.append(deployment_seconds(plane))
            print(f"   run {run + 1}: ready in {plane.ready_seconds:.2f}s")
    for phase, values in phases.items():
        print(f"   {phase:<24} healthy at {spread(values)}")
    print(f"   {'total (up ready)':<24} {spread(totals)}")
    print("== Deployment on an edge node: create -> Available")
    print("  ", spread(deployments))


if __name__ == "__main__":
    main()
