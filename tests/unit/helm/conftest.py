"""Fixtures for the chart's unit tests: the real helm binary and a renderer.

helm comes from the control-plane tools (scripts/build-k8s-tools; `make test` puts their
directory in LLMPIPE_K8S_BIN). These tests render templates locally: no cluster, no network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "helm" / "llmpipe"

Render = Callable[..., list[dict[str, Any]]]


def find_helm() -> str | None:
    """helm from LLMPIPE_K8S_BIN, else an already-built tools cache, else PATH."""
    env_dir = os.environ.get("LLMPIPE_K8S_BIN")
    if env_dir and (Path(env_dir) / "helm").is_file():
        return str(Path(env_dir) / "helm")
    built = subprocess.run(
        [str(ROOT / "scripts" / "build-k8s-tools"), "--dir"],
        capture_output=True,
        text=True,
        check=False,
    )
    if built.returncode == 0 and (Path(built.stdout.strip()) / "helm").is_file():
        return str(Path(built.stdout.strip()) / "helm")
    return shutil.which("helm")


@pytest.fixture(scope="session")
def helm() -> str:
    path = find_helm()
    if path is None:
        pytest.skip("helm not found: run scripts/build-k8s-tools (make test does)")
    return path


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm, *args], capture_output=True, text=True, check=False, timeout=60, env=_helm_env()
    )


def _helm_env() -> dict[str, str]:
    # A private HOME-less config: helm must not read or write the developer's repositories.
    env = dict(os.environ)
    env.setdefault("HELM_CACHE_HOME", "/tmp/llmpipe-helm-unit/cache")
    env.setdefault("HELM_CONFIG_HOME", "/tmp/llmpipe-helm-unit/config")
    env.setdefault("HELM_DATA_HOME", "/tmp/llmpipe-helm-unit/data")
    return env


@pytest.fixture(scope="session")
def render(helm: str) -> Render:
    """`helm template` with --set pairs; returns the rendered objects (CRDs included)."""

    def _render(*sets: str, extra: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        args = ["template", "demo", str(CHART), "--namespace", "llmpipe-system", "--include-crds"]
        for pair in sets:
            args += ["--set", pair]
        done = run_helm(helm, *args, *extra)
        assert done.returncode == 0, done.stderr
        return [doc for doc in yaml.safe_load_all(done.stdout) if doc]

    return _render


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]
