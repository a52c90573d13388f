"""Fixtures for the cluster tier: one real control plane per test session.

`control_plane` starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler and
kwok on loopback (tests/support/control_plane.py) once, and stops them at the end of the
session. It starts with no nodes: tests add their own (`control_plane.add_node(...)`) with
names of their own, and work in namespaces of their own (the `namespace` fixture).

Missing binaries fail the tests with instructions, never skip them silently; set
LLMPIPE_SKIP_CLUSTER=1 to skip the whole tier on purpose.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import control_plane as cp

SMALL_CLUSTER = Path(__file__).resolve().parents[1] / "support" / "clusters" / "small.yaml"


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cp.ControlPlane]:
    """A running control plane: `.kubeconfig`, `.env`, `.client()`, node helpers."""
    if os.environ.get("LLMPIPE_SKIP_CLUSTER") == "1":
        pytest.skip("LLMPIPE_SKIP_CLUSTER=1: cluster tests skipped on request")
    try:
        bin_dir = cp.find_bin_dir()
    except cp.MissingBinaries as error:
        pytest.fail(f"cluster tests need the control plane binaries: {error}", pytrace=False)
    plane = cp.ControlPlane.start(tmp_path_factory.mktemp("control-plane"), bin_dir=bin_dir)
    print(f"\ncontrol plane ready in {plane.ready_seconds:.1f}s at {plane.server}")
    try:
        yield plane
    finally:
        plane.stop()
        leaked = plane.alive()
        if leaked:
            pytest.fail(f"control plane processes still running after stop: {leaked}")


@pytest.fixture
def namespace(control_plane: cp.ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace (with its `default` ServiceAccount), deleted after the test."""
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower())[:40].strip("-")
    name = f"{base}-{uuid.uuid4().hex[:6]}"
    control_plane.create_namespace(name)
    yield name
    control_plane.delete_namespace(name)
