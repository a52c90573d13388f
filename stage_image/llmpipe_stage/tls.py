"""Mutual TLS between the stages: certificate files, gRPC credentials, who may call what.

A stage's TLS directory holds `ca.crt` (its pipeline's CA), `tls.crt` and `tls.key` (its
own certificate, naming it in a URI SAN, see `llmpipe_common.pki`). In Kubernetes it is
the stage's Secret, mounted read-only; `llmpipe serve` and the tests write one per stage
with `write_local_pki`. The files may change under a running stage (the operator renews
certificates before they expire and the kubelet swaps the mounted files): the server's
credentials are dynamic (each new handshake picks up changed files) and `Peers` opens new
channels when the files change, so rotation drops no connection and no request.

`allowed` is the authorization rule, pure: each RPC only from the one peer that may send it.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import grpc

from llmpipe_common import pki

log = logging.getLogger(__name__)

FILES = ("ca.crt", "tls.crt", "tls.key")
CHECK_INTERVAL_S = 1.0
"""How often the files are looked at (a stat each); a renewed certificate is in use within
this long of the kubelet writing it."""


class TlsError(RuntimeError):
    """The TLS directory cannot be used; the text names the file and what is wrong."""


@dataclass(frozen=True)
class Material:
    """One consistent reading of a TLS directory."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    identity: pki.StageIdentity


class TlsFiles:
    """A stage's TLS directory, re-read when its files change (thread-safe: gRPC's
    certificate fetcher runs on gRPC's own threads)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._signature = self._stat()
        self.material = self._read()
        self.generation = 0
        """Counts the changes taken; `Peers` reopens its channels when it moves."""
        self._checked = time.monotonic()

    def _stat(self) -> tuple[tuple[int, int, int], ...]:
        try:
            stats = [os.stat(self.directory / name) for name in FILES]
        except OSError as error:
            raise TlsError(f"{self.directory}: {error.strerror}: {error.filename}") from None
        return tuple((s.st_ino, s.st_mtime_ns, s.st_size) for s in stats)

    def _read(self) -> Material:
        ca, cert, key = ((self.directory / name).read_bytes() for name in FILES)
        if not pki.key_matches(cert, key):
            raise TlsError(f"{self.directory}: tls.key is not the key of tls.crt")
        try:
            identity = pki.identity_of(cert)
        except pki.PkiError as error:
            raise TlsError(f"{self.directory / 'tls.crt'}: {error}") from None
        return Material(ca, cert, key, identity)

    def refresh(self, *, force: bool = False) -> bool:
        """Take changed files if they form a usable set; returns whether anything changed.
        A half-written set (new certificate, old key) is skipped until it is complete."""
        with self._lock:
            now = time.monotonic()
            if not force and now - self._checked < CHECK_INTERVAL_S:
                return False
            self._checked = now
            try:
                signature = self._stat()
                if signature == self._signature:
                    return False
                material = self._read()
            except (TlsError, OSError) as error:
                log.warning("TLS files changed but cannot be used yet: %s", error)
                return False
            if material.identity != self.material.identity:
                log.error(
                    "refusing new TLS files: they name %s, this process is %s",
                    material.identity,
                    self.material.identity,
                )
                self._signature = signature
                return False
            self._signature, self.material = signature, material
            self.generation += 1
            log.info("TLS certificate reloaded from %s", self.directory)
            return True


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Requires a client certificate from the pipeline's CA; new handshakes use the files
    as they are now."""

    def config(material: Material) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(material.key_pem, material.cert_pem)], root_certificates=material.ca_pem
        )

    applied = [files.generation]  # what the server uses; Peers may have taken a change first

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        files.refresh()
        if files.generation == applied[0]:
            return None
        applied[0] = files.generation
        return config(files.material)

    return grpc.dynamic_ssl_server_credentials(
        config(files.material), fetch, require_client_authentication=True
    )


def channel_credentials(material: Material) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=material.ca_pem,
        private_key=material.key_pem,
        certificate_chain=material.cert_pem,
    )


# -- who may call what ---------------------------------------------------------------------

RULES = {
    "Forward": "the previous stage",
    "ReturnTokens": "the last stage",
    "Fail": "a later stage",
    "ReleaseSequences": "stage 0",
    "Info": "stage 0",
}


def allowed(
    rpc: str, *, peer: pki.StageIdentity, me: pki.StageIdentity, num_stages: int
) -> str | None:
    """None if `peer` may call `rpc` on `me`, else why not (for PERMISSION_DENIED)."""
    if not peer.same_plan(me):
        return f"{peer} is not a stage of {me.namespace}/{me.pipeline} plan {me.plan}"
    rule = RULES.get(rpc)
    if rule is None:
        return f"unknown RPC {rpc}"
    ok = {
        "Forward": peer.index == me.index - 1,
        "ReturnTokens": peer.index == num_stages - 1 and me.index == 0,
        # Any downstream stage may report that it cannot move a sequence on (its
        # neighbour is down): it is on every sequence's path anyway.
        "Fail": 0 < peer.index < num_stages and me.index == 0,
        "ReleaseSequences": peer.index == 0,
        "Info": peer.index == 0,
    }[rpc]
    return None if ok else f"{rpc} is taken only from {rule}, not from stage {peer.index}"


class PeerIdentities:
    """Peer certificate -> identity, parsed once per certificate (the hot path is a dict
    lookup)."""

    def __init__(self, size: int = 64) -> None:
        self._cache: OrderedDict[bytes, pki.StageIdentity | None] = OrderedDict()
        self._size = size

    def of(self, context: grpc.aio.ServicerContext) -> pki.StageIdentity | None:
        pems = context.auth_context().get("x509_pem_cert") or []
        if not pems:
            return None
        pem = pems[0]
        if pem in self._cache:
            self._cache.move_to_end(pem)
            return self._cache[pem]
        try:
            identity: pki.StageIdentity | None = pki.identity_of(pem)
        except pki.PkiError:
            identity = None
        self._cache[pem] = identity
        if len(self._cache) > self._size:
            self._cache.popitem(last=False)
        return identity


# -- local pipelines (`llmpipe serve`, tests, benchmarks) -----------------------------------


def write_local_pki(
    directory: Path,
    *,
    hosts: list[str],
    namespace: str = "local",
    pipeline: str = "serve",
    plan: str = "local",
    validity: pki.Validity | None = None,
) -> pki.KeyPair:
    """A fresh CA and one TLS directory per stage (`stage-<i>/`) under `directory`, which
    is created private (0700). The CA (with its key) is returned, never written: once the
    caller drops it, nobody can issue more."""
    validity = validity or pki.Validity()
    pipeline = dns_label(pipeline)
    now = datetime.datetime.now(datetime.UTC)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    ca = pki.new_ca(namespace=namespace, pipeline=pipeline, now=now, validity=validity)
    for index, host in enumerate(hosts):
        identity = pki.StageIdentity(namespace, pipeline, plan, index)
        issued = pki.issue_stage(ca, identity, hosts=(host,), now=now, validity=validity)
        write_tls_dir(directory / f"stage-{index}", ca.cert_pem, issued)
    return ca


def dns_label(name: str) -> str:
    """`name` as an identity component: lowercase, other characters as '-' (a model name
    such as SmolLM2-135M-Instruct names a local pipeline)."""
    label = re.sub(r"[^a-z0-9.-]+", "-", name.lower()).strip("-.")
    return label or "pipeline"


def write_tls_dir(path: Path, ca_pem: bytes, issued: pki.KeyPair) -> Path:
    """Write one TLS directory; each file replaced atomically (a rename), key mode 0600."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name, data in (
        ("ca.crt", ca_pem),
        ("tls.crt", issued.cert_pem),
        ("tls.key", issued.key_pem),
    ):
        temp = path / f".{name}.tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(temp, path / name)
    return path
