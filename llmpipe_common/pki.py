"""The stages' public-key infrastructure: a per-pipeline CA and one certificate per stage.

Purely computational: PEM bytes and datetimes in, PEM bytes and decisions out. No API
calls, no file I/O, no clock (the caller passes `now`); `reconcile.certs` stores what this
module issues in Secrets, and `llmpipe serve` writes it to a private temp dir.

A stage certificate says who the stage is in one URI SAN,
`spiffe://llmpipe.io/ns/<namespace>/pipeline/<name>/plan/<plan-hash>/stage/<index>`
(`StageIdentity`), and carries DNS or IP SANs of the address its neighbours dial, so the
client side's hostname check passes. The CA signs only its own pipeline's stages, so a TLS
handshake already refuses other pipelines; the stages then check the identity per RPC.
Keys are ECDSA P-256: handshakes are cheap and certificates small.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TRUST_DOMAIN = "llmpipe.io"
_URI = re.compile(
    r"^spiffe://llmpipe\.io/ns/(?P<namespace>[a-z0-9][a-z0-9.-]*)"
    r"/pipeline/(?P<pipeline>[a-z0-9][a-z0-9.-]*)"
    r"/plan/(?P<plan>[a-z0-9][a-z0-9-]*)/stage/(?P<index>0|[1-9][0-9]*)$"
)
BACKDATE = datetime.timedelta(minutes=5)
"""Certificates start a little in the past, so a neighbour whose clock runs behind does not
refuse a fresh one."""


class PkiError(ValueError):
    """A certificate or key that cannot be used; the text says which and why."""


@dataclass(frozen=True)
class Validity:
    """How long certificates live and when the operator replaces a stage's."""

    leaf_seconds: float = 30 * 24 * 3600.0
    """Stage certificates live 30 days: short enough that a leaked key soon stops working,
    long enough that an operator outage of days does not stop a pipeline."""
    renew_fraction: float = 2 / 3
    """A stage certificate is replaced after 2/3 of its life (day 20 of 30), leaving ten days
    for the new one to reach the pods (the kubelet refreshes mounted Secrets within minutes)."""
    ca_seconds: float = 10 * 365 * 24 * 3600.0
    """The CA lives 10 years: it is never mounted anywhere, and replacing it means new
    certificates for every stage at once."""

    def __post_init__(self) -> None:
        if not 0 < self.renew_fraction < 1:
            raise PkiError(f"renew_fraction must be in (0, 1), got {self.renew_fraction}")
        if self.leaf_seconds <= 0 or self.ca_seconds < self.leaf_seconds:
            raise PkiError(
                f"need 0 < leaf validity ({self.leaf_seconds:g} s) <= CA validity "
                f"({self.ca_seconds:g} s)"
            )


@dataclass(frozen=True)
class StageIdentity:
    """Which stage of which plan of which pipeline a certificate belongs to."""

    namespace: str
    pipeline: str
    plan: str
    """The plan hash (`manifests.names.plan_hash`): stages of two plans never talk."""
    index: int

    def __post_init__(self) -> None:
        if not _URI.match(self.uri):
            raise PkiError(
                f"{self.uri!r} is not an llmpipe stage identity (lowercase DNS names and a "
                "stage index >= 0)"
            )

    @property
    def uri(self) -> str:
        return (
            f"spiffe://{TRUST_DOMAIN}/ns/{self.namespace}/pipeline/{self.pipeline}"
            f"/plan/{self.plan}/stage/{self.index}"
        )

    @classmethod
    def from_uri(cls, uri: str) -> StageIdentity:
        match = _URI.match(uri)
        if match is None:
            raise PkiError(f"{uri!r} is not an llmpipe stage identity")
        return cls(
            namespace=match["namespace"],
            pipeline=match["pipeline"],
            plan=match["plan"],
            index=int(match["index"]),
        )

    def same_plan(self, other: StageIdentity) -> bool:
        return (self.namespace, self.pipeline, self.plan) == (
            other.namespace,
            other.pipeline,
            other.plan,
        )

    def __str__(self) -> str:
        return f"stage {self.index} of {self.namespace}/{self.pipeline} plan {self.plan}"


@dataclass(frozen=True)
class KeyPair:
    """A certificate and its private key, PEM-encoded."""

    cert_pem: bytes
    key_pem: bytes


def new_ca(*, namespace: str, pipeline: str, now: datetime.datetime, validity: Validity) -> KeyPair:
    """A self-signed CA for one pipeline; it may sign stage certificates only (pathlen 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, TRUST_DOMAIN),
            x509.NameAttribute(NameOID.COMMON_NAME, f"llmpipe CA {namespace}/{pipeline}"[:64]),
        ]
    )
    cert = (
        _builder(name, name, key.public_key(), now=now, seconds=validity.ca_seconds)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(_cert_pem(cert), _key_pem(key))


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    """ECDSA keys sign (handshakes, and certificates for the CA); they never encrypt."""
    return x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )


def issue_stage(
    ca: KeyPair,
    identity: StageIdentity,
    *,
    hosts: tuple[str, ...],
    now: datetime.datetime,
    validity: Validity,
) -> KeyPair:
    """A stage certificate for both TLS roles (it serves and it dials its neighbours)."""
    ca_cert, ca_key = load_cert(ca.cert_pem), _load_key(ca.key_pem)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, TRUST_DOMAIN),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{identity.pipeline}-s{identity.index}"[:64]),
        ]
    )
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
    names += [_host_name(host) for host in hosts]
    cert = (
        _builder(subject, ca_cert.subject, key.public_key(), now=now, seconds=validity.leaf_seconds)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return KeyPair(_cert_pem(cert), _key_pem(key))


def identity_of(cert_pem: bytes) -> StageIdentity:
    """The stage identity in a certificate's URI SAN; PkiError if it has none."""
    cert = load_cert(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PkiError("the certificate has no subjectAltName") from None
    uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if _URI.match(u)]
    if len(uris) != 1:
        raise PkiError(f"the certificate names {len(uris)} llmpipe stage identities, not 1")
    return StageIdentity.from_uri(uris[0])


def hosts_of(cert_pem: bytes) -> tuple[str, ...]:
    """The DNS and IP SANs of a certificate, in order."""
    cert = load_cert(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    hosts: list[str] = []
    for name in san:
        if isinstance(name, x509.DNSName):
            hosts.append(name.value)
        elif isinstance(name, x509.IPAddress):
            hosts.append(str(name.value))
    return tuple(hosts)


def verify_issued_by(ca_pem: bytes, cert_pem: bytes, *, now: datetime.datetime) -> None:
    """Raise PkiError unless `cert_pem` is signed by the CA and valid at `now`."""
    ca, cert = load_cert(ca_pem), load_cert(cert_pem)
    if cert.issuer != ca.subject:
        raise PkiError("the certificate was issued by another CA")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as error:
        raise PkiError(
            f"the CA's signature does not verify: {error or type(error).__name__}"
        ) from None
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise PkiError(
            f"the certificate is valid from {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} "
            f"to {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}, not at {now:%Y-%m-%dT%H:%M:%SZ}"
        )


def renew_at(cert_pem: bytes, *, renew_fraction: float) -> datetime.datetime:
    """When a certificate is due for replacement: `renew_fraction` of its way from
    notBefore (less the backdating) to notAfter."""
    cert = load_cert(cert_pem)
    start = cert.not_valid_before_utc + BACKDATE
    life = cert.not_valid_after_utc - start
    return start + life * renew_fraction


def renewal_due(cert_pem: bytes, *, now: datetime.datetime, renew_fraction: float) -> bool:
    return now >= renew_at(cert_pem, renew_fraction=renew_fraction)


def key_matches(cert_pem: bytes, key_pem: bytes) -> bool:
    """Whether the key is the certificate's (a half-updated pair of files is not)."""
    try:
        cert_key = load_cert(cert_pem).public_key()
        key = _load_key(key_pem).public_key()
    except PkiError:
        return False
    return cert_key.public_bytes(*_SPKI) == key.public_bytes(*_SPKI)


def load_cert(pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as error:
        raise PkiError(f"not a PEM certificate: {error}") from None


_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _load_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as error:
        raise PkiError(f"not an unencrypted PEM private key: {error}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"expected an EC private key, got {type(key).__name__}")
    return key


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    *,
    now: datetime.datetime,
    seconds: float,
) -> x509.CertificateBuilder:
    if now.tzinfo is None:
        raise PkiError("`now` must be timezone-aware (UTC)")
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(seconds=seconds))
    )


def _host_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
