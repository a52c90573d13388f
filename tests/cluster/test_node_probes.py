"""The operator side of the node probe against a real API server and a real probe process.

Two Nodes (not managed by kwok: their pods' status is ours to set) each carry a probe pod
whose status says Running at 127.0.0.1, where one real `python -m llmpipe_stage.probe`
listens. One `reconcile.probes.ProbeCollector.round` must: find the pods by label in the
namespace, read the facts, measure the one pair's link, and patch both Nodes'
`llmpipe.io/measured` and `llmpipe.io/links` through the API server, leaving a person's
link entry and compute label alone. A second round writes nothing (nothing moved beyond
the margin). No mocks: the API server, the probe's HTTP and TCP are real.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from lightkube import AsyncClient, KubeConfig
from lightkube.resources.core_v1 import Node, Pod
from lightkube.types import PatchType

from llmpipe_operator.reconcile import probes
from tests.support import control_plane as cp

ROOT = Path(__file__).resolve().parents[2]
LABELS = {"app.kubernetes.io/component": "node-probe"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def probe_process() -> Iterator[tuple[int, int]]:
    """(HTTP port, link port) of a real probe on loopback, after its first measurement."""
    port, link_port = free_port(), free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llmpipe_stage.probe",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--link-port",
            str(link_port),
            "--threads",
            "1",
            "--seconds",
            "0.3",
        ],
        env={
            "PYTHONPATH": f"{ROOT / 'stage_image'}:{ROOT / 'operator'}:{ROOT}",
            "PATH": "/usr/bin:/bin",
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/facts", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("the probe did not report its facts")
            time.sleep(0.5)
        yield port, link_port
    finally:
        process.terminate()
        process.wait()


def add_node_with_probe(control_plane: cp.ControlPlane, namespace: str, name: str) -> None:
    client = control_plane.client()
    client.create(
        Node.from_dict(
            {
                "metadata": {
                    "name": name,
                    "labels": {"llmpipe.io/tflops": "3"},  # a person's label: it stays
                    "annotations": {
                        "llmpipe.io/links": json.dumps({"elsewhere": {"mbps": 40, "rttMs": 9}})
                    },
                }
            }
        )
    )
    pod = client.create(
        Pod.from_dict(
            {
                "metadata": {"name": f"probe-{name}", "labels": LABELS},
                "spec": {"nodeName": name, "containers": [{"name": "probe", "image": "probe"}]},
            }
        ),
        namespace=namespace,
    )
    client.patch(
        Pod.Status,
        pod.metadata.name,
        {"status": {"phase": "Running", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}]}},
        namespace=namespace,
        patch_type=PatchType.MERGE,
    )


def test_a_probe_round_writes_measured_facts_onto_the_nodes(
    control_plane: cp.ControlPlane, namespace: str, probe_process: tuple[int, int]
) -> None:
    port, _ = probe_process
    tag = uuid.uuid4().hex[:6]
    names = [f"probe-a-{tag}", f"probe-b-{tag}"]
    for name in names:
        add_node_with_probe(control_plane, namespace, name)
    settings = probes.ProbeSettings(namespace=namespace, labels=LABELS, port=port)

    async def two_rounds() -> tuple[dict, dict]:
        client = AsyncClient(KubeConfig.from_file(control_plane.kubeconfig))
        collector = probes.ProbeCollector(client, settings)
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
                return await collector.round(session), await collector.round(session)
        finally:
            await client.close()

    try:
        first, second = asyncio.run(two_rounds())
        assert set(first) == set(names)
        assert second == {}  # the same node measured again: nothing moved beyond the margin
        for name in names:
            node = control_plane.client().get(Node, name)
            annotations = node.metadata.annotations or {}
            measured = json.loads(annotations["llmpipe.io/measured"])
            assert measured["tflops"] > 0 and measured["memoryBandwidthGBps"] > 0
            links = json.loads(annotations["llmpipe.io/links"])
            peer = next(n for n in names if n != name)
            assert links["elsewhere"] == {"mbps": 40, "rttMs": 9}  # a person's entry stays
            assert links[peer]["mbps"] > 0 and links[peer] == measured["links"][peer]
            assert node.metadata.labels["llmpipe.io/tflops"] == "3"
    finally:
        for name in names:
            control_plane.client().delete(Node, name)
