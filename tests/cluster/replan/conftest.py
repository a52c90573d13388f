"""Fixtures for the re-planning cluster tests: a lab (own namespace, own node group) with
the operator running against the shared control plane, watching only that namespace."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import control_plane as cp

from . import harness


@pytest.fixture
def lab(control_plane: cp.ControlPlane, namespace: str, tmp_path: Path) -> Iterator[harness.Lab]:
    harness.apply_crd(control_plane)
    lab = harness.Lab(control_plane, namespace, f"rp{uuid.uuid4().hex[:5]}", tmp_path)
    yield lab
    lab.remove_nodes()


@pytest.fixture
def operator(
    lab: harness.Lab, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[harness.OperatorProcess]:
    process = harness.OperatorProcess.start(lab.plane, lab.namespace, tmp_path / "operator.log")
    yield process
    process.stop()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(f"--- operator log (tail) ---\n{process.log_tail(80)}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
