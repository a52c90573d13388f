"""The stages' mutual TLS material, made by the real operator on a real control plane.

Covers: for a ready pipeline the operator has created the pipeline's CA Secret (owned by
the pipeline, mounted by no pod) and one kubernetes.io/tls Secret per stage (owned by its
plan's ConfigMap) whose certificate verifies against that CA and names exactly that stage
(namespace, pipeline, plan hash, index) and its Service's DNS names; each stage pod mounts
only its own Secret, read-only, mode 0440, and the container is told where; a leaf near
expiry (the operator runs with a 90 s validity, renewal at 1/2) is reissued by the same CA
in place, before it expires, without touching the Deployments or pods; the certificates go
with the pipeline.
"""

from __future__ import annotations

import base64
import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from lightkube import ApiError, Client
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import Pod, Secret

from llmpipe_common import pki
from tests.cluster.operator.conftest import Pool, pipeline_manifest, start_operator, stop_operator
from tests.cluster.operator.test_operator import LLMPipeline, apply, wait_ready
from tests.support import control_plane as cp
from tests.support import wait

VALIDITY_S = 90


def secret_data(client: Client, namespace: str, name: str) -> dict[str, bytes]:
    secret = client.get(Secret, name, namespace=namespace)
    return {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}


def not_after(cert_pem: bytes) -> datetime.datetime:
    return x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc


def test_operator_issues_mounts_and_renews_stage_certificates(
    control_plane: cp.ControlPlane,
    crd: Path,
    namespace: str,
    pool: Pool,
    tmp_path: Path,
) -> None:
    operator = start_operator(
        control_plane,
        namespace=namespace,
        workdir=tmp_path,
        extra_args=("--stage-cert-validity", str(VALIDITY_S), "--stage-cert-renew-fraction", "0.5"),
    )
    try:
        check(control_plane, operator, namespace, pool)
    finally:
        stop_operator(control_plane, operator)


def check(control_plane: cp.ControlPlane, operator: Any, namespace: str, pool: Pool) -> None:
    client = control_plane.client()
    pool.add("edge-a", tier="edge", memory="300Mi")
    pool.add("cloud-a", tier="cloud", memory="1Gi")
    manifest = pipeline_manifest("sealed", selector=pool.selector, placement={"firstStage": "edge"})
    result = apply(control_plane, namespace, manifest)
    assert result.returncode == 0, result.stderr
    st = wait_ready(client, operator, namespace, "sealed")
    digest, count = st["planHash"], len(st["plan"]["stages"])
    assert count == 2
    pipeline = client.get(LLMPipeline, "sealed", namespace=namespace)

    # 1. the CA: owned by the pipeline, a CA certificate and its key
    ca_secret = client.get(Secret, "sealed-llmpipe-ca", namespace=namespace)
    (owner,) = ca_secret.metadata.ownerReferences
    assert (owner.kind, owner.uid) == ("LLMPipeline", pipeline.metadata.uid)
    ca = secret_data(client, namespace, "sealed-llmpipe-ca")
    assert pki.key_matches(ca["ca.crt"], ca["ca.key"])

    # 2. one Secret per stage, from that CA, naming exactly that stage
    leaves = {}
    for index in range(count):
        name = f"sealed-{digest}-s{index}-tls"
        secret = client.get(Secret, name, namespace=namespace)
        assert secret.type == "kubernetes.io/tls"
        (owner,) = secret.metadata.ownerReferences
        assert (owner.kind, owner.name) == ("ConfigMap", f"sealed-{digest}-plan")
        data = secret_data(client, namespace, name)
        assert data["ca.crt"] == ca["ca.crt"]
        now = datetime.datetime.now(datetime.UTC)
        pki.verify_issued_by(ca["ca.crt"], data["tls.crt"], now=now)
        assert pki.key_matches(data["tls.crt"], data["tls.key"])
        assert pki.identity_of(data["tls.crt"]) == pki.StageIdentity(
            namespace, "sealed", digest, index
        )
        assert f"sealed-{digest}-s{index}.{namespace}.svc" in pki.hosts_of(data["tls.crt"])
        leaves[index] = data["tls.crt"]

    # 3. each pod mounts its own certificate only; nobody mounts the CA
    deployments = {}
    for index in range(count):
        deployment = client.get(Deployment, f"sealed-{digest}-s{index}", namespace=namespace)
        deployments[index] = deployment.metadata.generation
        pod = deployment.spec.template.spec
        secrets = {v.name: v.secret for v in pod.volumes if v.secret is not None}
        assert list(secrets) == ["tls"]
        assert secrets["tls"].secretName == f"sealed-{digest}-s{index}-tls"
        assert secrets["tls"].defaultMode == 0o440
        (container,) = pod.containers
        (mount,) = [m for m in container.volumeMounts if m.name == "tls"]
        assert mount.readOnly is True and mount.subPath is None
        assert container.command[container.command.index("--tls-dir") + 1] == mount.mountPath
        assert pod.securityContext.fsGroup == 10001
    pods = {
        p.metadata.uid
        for p in client.list(Pod, namespace=namespace, labels={"llmpipe.io/pipeline": "sealed"})
    }

    # 4. renewal: at half of the 90 s life each leaf is replaced in place, before expiry
    def renewed() -> dict[int, bytes] | None:
        current = {
            i: secret_data(client, namespace, f"sealed-{digest}-s{i}-tls")["tls.crt"]
            for i in range(count)
        }
        return current if all(current[i] != leaves[i] for i in range(count)) else None

    fresh = wait.until(
        renewed,
        what="renewed stage certificates",
        timeout=VALIDITY_S,
        interval=2,
        seen=operator.log_tail,
    )
    now = datetime.datetime.now(datetime.UTC)
    for index in range(count):
        assert now < not_after(leaves[index]), "renewed only after the old one expired"
        pki.verify_issued_by(ca["ca.crt"], fresh[index], now=now)
        assert pki.identity_of(fresh[index]) == pki.identity_of(leaves[index])
        assert not_after(fresh[index]) > not_after(leaves[index])
        deployment = client.get(Deployment, f"sealed-{digest}-s{index}", namespace=namespace)
        assert deployment.metadata.generation == deployments[index]
    assert secret_data(client, namespace, "sealed-llmpipe-ca") == ca  # the CA stays
    assert {
        p.metadata.uid
        for p in client.list(Pod, namespace=namespace, labels={"llmpipe.io/pipeline": "sealed"})
    } == pods
    assert "issued the certificate of" in operator.log.read_text()

    # 5. the certificates go with the pipeline (garbage collection through the owners)
    client.delete(LLMPipeline, "sealed", namespace=namespace)

    def gone() -> bool:
        for name in ["sealed-llmpipe-ca", *(f"sealed-{digest}-s{i}-tls" for i in range(count))]:
            try:
                client.get(Secret, name, namespace=namespace)
                return False
            except ApiError as error:
                if error.status.code != 404:
                    raise
        return True

    wait.until(gone, what="the certificate Secrets deleted with the pipeline", timeout=60)
