"""Re-planning benchmark on the simulated cluster (prints figures; asserts nothing about speed).

Time from a node's deletion to the new plan fully Running: a pipeline runs on three kwok
nodes (three stages); one stage's node is deleted; the clock stops when the new plan's
stage pods are all Running on their planned nodes and the pipeline is Ready on it (the
user-facing Service switched). Also split out: deletion -> new plan hash in status (the
operator's reaction: node event, re-plan, deploy) and the rest (scheduling, pods Running,
Deployments Available, Service switch). Repeated; p50 and p95.

    PYTHONPATH=operator:stage_image:. python bench/replan.py [--runs 20]

Needs the control-plane binaries (scripts/build-k8s-tools); starts its own control plane
and operator in a temporary directory and stops them at the end.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from lightkube.resources.core_v1 import Node

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.cluster.replan import harness  # noqa: E402
from tests.support import control_plane as cp  # noqa: E402

SMALL = {"tier": "edge", "memory": "48Mi"}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, round(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def one_run(plane: cp.ControlPlane, workdir: Path, index: int) -> tuple[float, float]:
    namespace = f"bench-replan-{index}-{uuid.uuid4().hex[:4]}"
    plane.create_namespace(namespace)
    lab = harness.Lab(plane, namespace, f"bn{uuid.uuid4().hex[:5]}", workdir)
    operator = harness.OperatorProcess.start(plane, namespace, workdir / f"operator-{index}.log")
    try:
        for i in range(3):
            lab.add_node(f"e{i}", **SMALL)
        lab.apply_pipeline("chat", replan={"debounceSeconds": 30})
        first = lab.wait_ready("chat")
        lab.wait_pods_running("chat", first)
        victim = lab.planned_nodes(first)[1]
        old = first["planHash"]

        started = time.monotonic()
        lab.plane.client().delete(Node, victim)
        replanned = None
        while True:
            st = lab.status("chat")
            if replanned is None and st.get("planHash") not in (None, old):
                replanned = time.monotonic() - started
            if (
                st.get("phase") == "Ready"
                and st.get("planHash") not in (None, old)
                and st.get("planHash") == st.get("servingPlanHash")
                and running_as_planned(lab, st)
            ):
                total = time.monotonic() - started
                break
            if time.monotonic() - started > 120:
                raise RuntimeError(f"run {index}: no new plan Running after 120 s: {st}")
            time.sleep(0.05)
        lab.nodes.remove(victim)
        return replanned or total, total
    finally:
        operator.stop()
        lab.remove_nodes()
        plane.delete_namespace(namespace)


def running_as_planned(lab: harness.Lab, st: dict) -> bool:
    want = {int(s["index"]): s["node"] for s in st["plan"]["stages"]}
    on = {
        int(p.metadata.labels["llmpipe.io/stage-index"]): p.spec.nodeName
        for p in lab.stage_pods("chat", st["planHash"])
        if p.status.phase == "Running" and p.metadata.deletionTimestamp is None
    }
    return on == want


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmpipe-bench-replan-") as tmp:
        workdir = Path(tmp)
        with cp.running(workdir / "control-plane") as plane:
            harness.apply_crd(plane)
            reacted, totals = [], []
            for index in range(args.runs):
                react, total = one_run(plane, workdir, index)
                reacted.append(react)
                totals.append(total)
                print(f"run {index + 1:2d}: new plan in status {react:5.2f} s, "
                      f"fully Running {total:5.2f} s", flush=True)  # fmt: skip
    print()
    print(f"node deletion -> new plan fully Running ({args.runs} runs, 3 stages -> 2):")
    print(f"  p50 {percentile(totals, 50):.2f} s   p95 {percentile(totals, 95):.2f} s   "
          f"min {min(totals):.2f} s   max {max(totals):.2f} s   "
          f"mean {statistics.mean(totals):.2f} s")  # fmt: skip
    print("node deletion -> new plan hash in status (operator reaction):")
    print(f"  p50 {percentile(reacted, 50):.2f} s   p95 {percentile(reacted, 95):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
