"""Builders and decisions for the stages' certificates: the CA Secret, one Secret per stage.

Pure: certificates come from `pki` (given `now`), Secrets are returned as plain dicts for
`k8s.api` to apply, and `stage_secret_problem` says whether a stored stage Secret must be
(re)issued. `reconcile.certs` does the reading and writing.

- `<pipeline>-llmpipe-ca` (type Opaque: `ca.crt`, `ca.key`): owned by the pipeline, so it
  goes with it; mounted nowhere, read by the operator only.
- `<pipeline>-<planhash>-s<i>-tls` (type kubernetes.io/tls: `tls.crt`, `tls.key`,
  `ca.crt`): owned by its plan's ConfigMap, so it goes when its plan is removed; mounted
  read-only into that stage's pod only.
"""

from __future__ import annotations

import base64
import datetime
from collections.abc import Mapping
from typing import Any

from llmpipe_common import pki
from llmpipe_operator.manifests import names


def stage_identity(pipeline: names.PipelineRef, digest: str, index: int) -> pki.StageIdentity:
    return pki.StageIdentity(pipeline.namespace, pipeline.name, digest, index)


def build_ca_secret(pipeline: names.PipelineRef, ca: pki.KeyPair) -> dict[str, Any]:
    labels = {**names.pipeline_labels(pipeline), names.LABEL_COMPONENT: "ca"}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": names.metadata(pipeline, names.ca_secret_name(pipeline), labels),
        "type": "Opaque",
        "data": {"ca.crt": _b64(ca.cert_pem), "ca.key": _b64(ca.key_pem)},
    }


def build_stage_secret(
    pipeline: names.PipelineRef,
    *,
    digest: str,
    index: int,
    ca_pem: bytes,
    issued: pki.KeyPair,
    plan_configmap_uid: str,
) -> dict[str, Any]:
    name = names.stage_tls_secret_name(pipeline, digest, index)
    labels = {
        **names.plan_labels(pipeline, digest),
        **names.stage_selector(pipeline, digest, index),
        names.LABEL_COMPONENT: "stage-tls",
    }
    metadata = names.metadata(pipeline, name, labels)
    metadata["ownerReferences"] = [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "name": names.plan_configmap_name(pipeline, digest),
            "uid": plan_configmap_uid,
        }
    ]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata,
        "type": "kubernetes.io/tls",
        "data": {
            "tls.crt": _b64(issued.cert_pem),
            "tls.key": _b64(issued.key_pem),
            "ca.crt": _b64(ca_pem),
        },
    }


def read_ca(secret: Mapping[str, Any] | None, *, pipeline: names.PipelineRef) -> pki.KeyPair | None:
    """The CA stored in its Secret, or None when there is none or it is unusable. A Secret
    the pipeline does not own is unusable: someone who may create Secrets in the namespace
    must not be able to plant a CA of their own before the pipeline exists."""
    owners = ((secret or {}).get("metadata") or {}).get("ownerReferences") or []
    if not any(o.get("uid") == pipeline.uid and o.get("kind") == names.KIND for o in owners):
        return None
    data = _data(secret)
    if "ca.crt" not in data or "ca.key" not in data:
        return None
    pair = pki.KeyPair(data["ca.crt"], data["ca.key"])
    return pair if pki.key_matches(pair.cert_pem, pair.key_pem) else None


def stage_secret_problem(
    secret: Mapping[str, Any] | None,
    *,
    ca_pem: bytes,
    identity: pki.StageIdentity,
    hosts: tuple[str, ...],
    now: datetime.datetime,
    validity: pki.Validity,
) -> str | None:
    """Why the stage's Secret needs a new certificate (None: it is good as it is)."""
    data = _data(secret)
    if secret is None:
        return "no certificate yet"
    cert, key = data.get("tls.crt"), data.get("tls.key")
    if cert is None or key is None or data.get("ca.crt") != ca_pem:
        return "the Secret is incomplete or carries another CA"
    try:
        pki.verify_issued_by(ca_pem, cert, now=now)
        if pki.identity_of(cert) != identity or pki.hosts_of(cert) != hosts:
            return "the certificate names another stage"
    except pki.PkiError as error:
        return str(error)
    if not pki.key_matches(cert, key):
        return "tls.key is not the certificate's key"
    due = pki.renew_at(cert, renew_fraction=validity.renew_fraction)
    if now >= due:
        return f"renewal due since {due:%Y-%m-%dT%H:%M:%SZ}"
    return None


def _data(secret: Mapping[str, Any] | None) -> dict[str, bytes]:
    if secret is None:
        return {}
    raw = secret.get("data") or {}
    try:
        return {key: base64.b64decode(value) for key, value in raw.items()}
    except (ValueError, TypeError):
        return {}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
