"""Fixtures for the operator's cluster tests: the CRD, and the operator as a real process.

`operator` renders the chart's RBAC, ServiceAccount and policy ConfigMap with the real
`helm template` (the release in a namespace of its own, as the chart requires, watching the
test's namespace), applies them, and starts `python -m llmpipe_operator --namespace <ns>
--policy <the ConfigMap's policy.json>` authenticated as that ServiceAccount's token: the
tests exercise the operator under exactly the permissions and the policy the chart renders,
never as admin. The policy adds the test stage image (`llmpipe-stage:*`) to the chart's
defaults.
`pool` adds simulated nodes carrying a label unique to the test, which the test's pipelines
select, so nodes of other tests sharing the control plane never take part.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightkube import ApiError

from tests.support import control_plane as cp
from tests.support import nodes, wait

REPO = Path(__file__).resolve().parents[3]
CRD = REPO / "crds" / "llmpipeline.yaml"
CHART = REPO / "helm" / "llmpipe"
POOL_LABEL = "test.llmpipe.io/pool"
TEST_POLICY = ("policy.allowedImages={llmpipe-stage:*,ghcr.io/llmpipe/llmpipe-stage:*}",)
"""Values for the test operator's policy: the chart's defaults plus the test stage image."""


@pytest.fixture(scope="session")
def crd(control_plane: cp.ControlPlane) -> Path:
    """The LLMPipeline CRD, applied and Established."""
    control_plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    control_plane.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/llmpipelines.llmpipe.io"
    )
    return CRD


@dataclass
class OperatorProcess:
    process: subprocess.Popen[bytes]
    log: Path
    namespace: str
    health_port: int
    account: str = ""
    cluster_objects: list[str] = field(default_factory=list)
    release_namespace: str = ""

    def log_tail(self, lines: int = 60) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")


def render_rbac(
    control_plane: cp.ControlPlane,
    *,
    release: str,
    namespace: str,
    watch: list[str],
    templates: tuple[str, ...] = ("serviceaccount.yaml", "rbac.yaml"),
    values: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """The chart's ServiceAccount + RBAC (or other `templates`) of a release in `namespace`
    watching `watch`, from the real helm binary."""
    args = [str(control_plane.bin_dir / "helm"), "template", release, str(CHART)]
    args += ["--namespace", namespace]  # watch.namespaces[i] replaces the default list's items
    for template in templates:
        args += ["--show-only", f"templates/{template}"]
    for i, ns in enumerate(watch):
        args += ["--set", f"watch.namespaces[{i}]={ns}"]
    for pair in values:
        args += ["--set", pair]
    rendered = subprocess.run(
        args, env=control_plane.env, capture_output=True, text=True, check=True, timeout=60
    ).stdout
    return [doc for doc in yaml.safe_load_all(rendered) if doc]


def operator_release_namespace(control_plane: cp.ControlPlane) -> str:
    """A namespace of its own for the operator's ServiceAccount (the chart refuses to let the
    operator write in its release namespace, so it must not be a watched one)."""
    name = f"llmpipe-op-{uuid.uuid4().hex[:8]}"
    control_plane.create_namespace(name)
    return name


def write_policy(
    control_plane: cp.ControlPlane, *, release: str, namespace: str, path: Path
) -> Path:
    """The chart's policy ConfigMap (TEST_POLICY values) as the file --policy reads."""
    (config,) = render_rbac(
        control_plane,
        release=release,
        namespace=namespace,
        watch=["unused"],
        templates=("policy.yaml",),
        values=(*TEST_POLICY, "policy.admission.enabled=false"),
    )
    path.write_text(config["data"]["policy.json"])
    return path


def start_operator(
    control_plane: cp.ControlPlane,
    *,
    namespace: str,
    workdir: Path,
    watch: list[str] | None = None,
    extra_args: tuple[str, ...] = (),
    policy_file: Path | None = None,
    all_namespaces: bool = False,
) -> OperatorProcess:
    """Apply the chart's RBAC, then run the operator as its ServiceAccount under the chart's
    policy (TEST_POLICY, or `policy_file`). `all_namespaces`: the chart's cluster-wide
    opt-in (`--all-namespaces`; writes granted in `watch` only)."""
    workdir.mkdir(parents=True, exist_ok=True)
    release = f"llmpipe-{uuid.uuid4().hex[:6]}"
    home = operator_release_namespace(control_plane)
    docs = render_rbac(
        control_plane,
        release=release,
        namespace=home,
        watch=watch or [namespace],
        values=("watch.allNamespaces=true",) if all_namespaces else (),
    )
    manifest = workdir / "rbac.yaml"
    manifest.write_text(yaml.safe_dump_all(docs))
    control_plane.kubectl("apply", "-f", str(manifest))
    if policy_file is None:
        policy_file = write_policy(
            control_plane, release=release, namespace=home, path=workdir / "policy.json"
        )
    cluster_objects = [
        f"{d['kind'].lower()}/{d['metadata']['name']}"
        for d in docs
        if d["kind"] in ("ClusterRole", "ClusterRoleBinding")
    ]
    (account,) = [d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"]
    kubeconfig = control_plane.service_account_kubeconfig(
        home, account, path=workdir / "operator.kubeconfig"
    )
    port = cp.free_port()
    log = workdir / "operator.log"
    env = {
        **control_plane.env,
        "KUBECONFIG": str(kubeconfig),
        "PYTHONPATH": f"{REPO}:{REPO / 'operator'}",
        "PYTHONUNBUFFERED": "1",
    }
    args = [
        sys.executable,
        "-m",
        "llmpipe_operator",
        "--health-port",
        str(port),
        "--metrics-port",
        "0",
        "--policy",
        str(policy_file),
    ]
    if all_namespaces:
        args.append("--all-namespaces")
    for ns in [] if all_namespaces else watch or [namespace]:
        args += ["--namespace", ns]
    args += extra_args
    with log.open("wb") as out:
        process = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    handle = OperatorProcess(process, log, namespace, port, account, cluster_objects, home)
    wait.until(
        lambda: process.poll() is None and _healthy(port),
        what="the operator's /healthz",
        timeout=60,
        interval=0.3,
        seen=lambda: f"exit={process.poll()} log:\n{handle.log_tail()}",
    )
    return handle


def stop_operator(control_plane: cp.ControlPlane, handle: OperatorProcess) -> None:
    if handle.process.poll() is None:
        handle.process.send_signal(signal.SIGTERM)
        try:
            handle.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            handle.process.kill()
            handle.process.wait(timeout=5)
    for obj in handle.cluster_objects:
        control_plane.kubectl("delete", "--ignore-not-found", obj, check=False)
    if handle.release_namespace:
        control_plane.kubectl(
            "delete", "namespace", handle.release_namespace, "--wait=false", check=False
        )


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


@pytest.fixture
def operator(
    control_plane: cp.ControlPlane, crd: Path, namespace: str, tmp_path: Path
) -> Iterator[OperatorProcess]:
    handle = start_operator(control_plane, namespace=namespace, workdir=tmp_path)
    try:
        yield handle
    finally:
        stop_operator(control_plane, handle)
        keep = os.environ.get("LLMPIPE_KEEP_OPERATOR_LOG")
        if keep:  # a path: the whole operator log is copied there for a post-mortem
            Path(keep).write_bytes(handle.log.read_bytes())


@dataclass
class Pool:
    """Simulated nodes of one test: unique names, one shared selector label."""

    control_plane: cp.ControlPlane
    label: str
    names: list[str] = field(default_factory=list)

    def add(self, name: str, **fields: Any) -> str:
        full = f"{self.label}-{name}"
        labels = {POOL_LABEL: self.label, **fields.pop("labels", {})}
        self.control_plane.add_node(nodes.NodeSpec(name=full, labels=labels, **fields))
        self.names.append(full)
        return full

    @property
    def selector(self) -> dict[str, str]:
        return {POOL_LABEL: self.label}


@pytest.fixture
def pool(control_plane: cp.ControlPlane) -> Iterator[Pool]:
    created = Pool(control_plane, f"p{uuid.uuid4().hex[:6]}")
    yield created
    for name in created.names:
        with contextlib.suppress(ApiError, AssertionError):
            control_plane.remove_node(name)


def pipeline_manifest(name: str, *, selector: dict[str, str], **spec: Any) -> dict[str, Any]:
    """An LLMPipeline for a generated Llama-style model (its config is all the planner needs)."""
    body: dict[str, Any] = {
        "model": {
            "name": "tiny-llama-16",
            "source": {"hostPath": {"path": "/var/lib/llmpipe/models/tiny"}},
            "config": dict(MODEL_CONFIG),
        },
        "placement": {"nodeSelector": selector},
        "runtime": {"image": "llmpipe-stage:test", "runtimeOverhead": "64Mi"},
    }
    for key, value in spec.items():
        body.setdefault(key, {}).update(value)
    return {
        "apiVersion": "llmpipe.io/v1alpha1",
        "kind": "LLMPipeline",
        "metadata": {"name": name},
        "spec": body,
    }


MODEL_CONFIG: dict[str, Any] = {
    # ~26 MB per layer in bfloat16: 16 layers + embeddings + head ~ 540 MB, so 400Mi edge
    # nodes cannot hold it alone and a pipeline needs several of them.
    "model_type": "llama",
    "num_hidden_layers": 16,
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
    "max_position_embeddings": 2048,
}


def now() -> float:
    return time.monotonic()
