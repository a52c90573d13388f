"""Fixtures for the nodes tier: a control plane with two real nodes (kubelet + containerd
+ runc + a CNI bridge each), kube-proxy, a cluster DNS and a kwok node, once per session
(tests/support/real_nodes.py).

It needs root, the node binaries (`scripts/build-k8s-tools --node`), the images
(`scripts/build-images`) and containerd, runc, the CNI plugins and iptables from Debian;
`scripts/test` provides all of them on CI. Anything missing fails the tests with what to
run, never skips them silently. The tier is opt-in: scripts/test sets LLMPIPE_SKIP_NODES=1
unless LLMPIPE_NODES=1 (its image build does not fit the cold make-test budget).
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator

import pytest

from tests.support import control_plane as cp
from tests.support import real_nodes


@pytest.fixture(scope="session")
def real_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[real_nodes.RealCluster]:
    if os.environ.get("LLMPIPE_SKIP_NODES") == "1":
        pytest.skip(
            "the nodes tier is opt-in (LLMPIPE_NODES=1 scripts/test, or make test-nodes): "
            "its image build does not fit the cold make-test budget (docs/real-nodes.md)"
        )
    try:
        cluster = real_nodes.RealCluster.start(tmp_path_factory.mktemp("real-nodes"))
    except cp.MissingBinaries as error:
        pytest.fail(f"the nodes tier cannot start: {error}", pytrace=False)
    print(f"\nreal nodes ready: {cluster.timings}")
    try:
        yield cluster
    finally:
        cluster.stop()
        leaked = cluster.alive()
        if leaked:
            pytest.fail(f"real-node processes still running after stop: {leaked}")


@pytest.fixture
def namespace(
    real_cluster: real_nodes.RealCluster, request: pytest.FixtureRequest
) -> Iterator[str]:
    """A fresh namespace (with its `default` ServiceAccount), deleted after the test."""
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower())[:40].strip("-")
    name = f"{base}-{uuid.uuid4().hex[:6]}"
    real_cluster.plane.create_namespace(name)
    yield name
    real_cluster.plane.delete_namespace(name)
