"""The stages' PKI (pure): the per-pipeline CA, stage certificates, identities, renewal.

Covers: a stage certificate verifies against its CA and not against another pipeline's;
it names its stage in exactly one URI SAN (round trip) and carries its hosts as DNS/IP
SANs and both TLS roles; the CA may sign leaves only; the renewal time is 2/3 of the leaf's
life (or the configured fraction) and expiry is enforced; malformed identities, keys and
settings are refused with a reason; the manifests' decision when a stored stage Secret
needs a new certificate; and the stage's per-RPC rule table.
"""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from llmpipe_common import pki
from llmpipe_operator.manifests import names
from llmpipe_operator.manifests import tls as tls_manifests
from tests.unit.manifests.builders import REF

NOW = datetime.datetime(2026, 12, 1, 12, 0, tzinfo=datetime.UTC)
VALIDITY = pki.Validity()
IDENTITY = pki.StageIdentity("team-a", "chat", "abcd1234", 1)
HOSTS = ("chat-abcd1234-s1.team-a.svc", "10.0.0.7")


@pytest.fixture(scope="module")
def ca() -> pki.KeyPair:
    return pki.new_ca(namespace="team-a", pipeline="chat", now=NOW, validity=VALIDITY)


@pytest.fixture(scope="module")
def leaf(ca: pki.KeyPair) -> pki.KeyPair:
    return pki.issue_stage(ca, IDENTITY, hosts=HOSTS, now=NOW, validity=VALIDITY)


def test_a_stage_certificate_verifies_against_its_ca_only(
    ca: pki.KeyPair, leaf: pki.KeyPair
) -> None:
    pki.verify_issued_by(ca.cert_pem, leaf.cert_pem, now=NOW)
    other = pki.new_ca(namespace="team-a", pipeline="other", now=NOW, validity=VALIDITY)
    with pytest.raises(pki.PkiError, match="another CA"):
        pki.verify_issued_by(other.cert_pem, leaf.cert_pem, now=NOW)
    # Same subject, different key: the signature is what counts.
    twin = pki.new_ca(namespace="team-a", pipeline="chat", now=NOW, validity=VALIDITY)
    with pytest.raises(pki.PkiError, match="signature"):
        pki.verify_issued_by(twin.cert_pem, leaf.cert_pem, now=NOW)


def test_the_certificate_names_its_stage_and_hosts(leaf: pki.KeyPair) -> None:
    assert pki.identity_of(leaf.cert_pem) == IDENTITY
    assert pki.hosts_of(leaf.cert_pem) == HOSTS
    cert = x509.load_pem_x509_certificate(leaf.cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://llmpipe.io/ns/team-a/pipeline/chat/plan/abcd1234/stage/1"
    ]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usage) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert pki.key_matches(leaf.cert_pem, leaf.key_pem)


def test_the_ca_signs_leaves_only(ca: pki.KeyPair) -> None:
    cert = x509.load_pem_x509_certificate(ca.cert_pem)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca is True and constraints.path_length == 0
    life = cert.not_valid_after_utc - cert.not_valid_before_utc - pki.BACKDATE
    assert life == datetime.timedelta(seconds=VALIDITY.ca_seconds)


def test_renewal_is_due_at_two_thirds_of_the_leaf_life(leaf: pki.KeyPair) -> None:
    cert = x509.load_pem_x509_certificate(leaf.cert_pem)
    assert cert.not_valid_before_utc == NOW - pki.BACKDATE  # a neighbour's clock may lag
    assert cert.not_valid_after_utc == NOW + datetime.timedelta(days=30)
    due = pki.renew_at(leaf.cert_pem, renew_fraction=VALIDITY.renew_fraction)
    assert due == NOW + datetime.timedelta(days=20)
    assert not pki.renewal_due(
        leaf.cert_pem, now=due - datetime.timedelta(seconds=1), renew_fraction=2 / 3
    )
    assert pki.renewal_due(leaf.cert_pem, now=due, renew_fraction=2 / 3)
    half = pki.renew_at(leaf.cert_pem, renew_fraction=0.5)
    assert half == NOW + datetime.timedelta(days=15)


def test_an_expired_or_not_yet_valid_certificate_does_not_verify(
    ca: pki.KeyPair, leaf: pki.KeyPair
) -> None:
    with pytest.raises(pki.PkiError, match="valid from"):
        pki.verify_issued_by(ca.cert_pem, leaf.cert_pem, now=NOW + datetime.timedelta(days=31))
    with pytest.raises(pki.PkiError, match="valid from"):
        pki.verify_issued_by(ca.cert_pem, leaf.cert_pem, now=NOW - datetime.timedelta(hours=1))


@pytest.mark.parametrize(
    "uri",
    [
        "spiffe://llmpipe.io/ns/a/pipeline/b/plan/c/stage/-1",
        "spiffe://llmpipe.io/ns/a/pipeline/b/plan/c/stage/01",
        "spiffe://evil.example/ns/a/pipeline/b/plan/c/stage/0",
        "spiffe://llmpipe.io/ns/a/pipeline/b/stage/0",
        "spiffe://llmpipe.io/ns/A/pipeline/b/plan/c/stage/0",
    ],
)
def test_malformed_identities_are_refused(uri: str) -> None:
    with pytest.raises(pki.PkiError, match="not an llmpipe stage identity"):
        pki.StageIdentity.from_uri(uri)


def test_identity_round_trips_and_compares_plans() -> None:
    assert pki.StageIdentity.from_uri(IDENTITY.uri) == IDENTITY
    assert IDENTITY.same_plan(pki.StageIdentity("team-a", "chat", "abcd1234", 0))
    assert not IDENTITY.same_plan(pki.StageIdentity("team-a", "chat", "ffff0000", 1))
    assert not IDENTITY.same_plan(pki.StageIdentity("team-b", "chat", "abcd1234", 1))


def test_bad_inputs_are_refused_with_a_reason(ca: pki.KeyPair, leaf: pki.KeyPair) -> None:
    with pytest.raises(pki.PkiError, match="renew_fraction"):
        pki.Validity(renew_fraction=1.0)
    with pytest.raises(pki.PkiError, match="leaf validity"):
        pki.Validity(leaf_seconds=100, ca_seconds=10)
    with pytest.raises(pki.PkiError, match="timezone-aware"):
        pki.new_ca(namespace="a", pipeline="b", now=NOW.replace(tzinfo=None), validity=VALIDITY)
    with pytest.raises(pki.PkiError, match="not a PEM certificate"):
        pki.identity_of(b"garbage")
    with pytest.raises(pki.PkiError, match="no subjectAltName"):
        pki.identity_of(ca.cert_pem)  # the CA names no stage
    assert not pki.key_matches(leaf.cert_pem, ca.key_pem)
    assert not pki.key_matches(leaf.cert_pem, b"not a key")


# -- manifests.tls: when a stored stage Secret needs a new certificate ---------------------


def stage_secret(ca: pki.KeyPair, pair: pki.KeyPair, digest: str = "abcd1234") -> dict:
    return tls_manifests.build_stage_secret(
        REF, digest=digest, index=1, ca_pem=ca.cert_pem, issued=pair, plan_configmap_uid="cm-uid"
    )


def problem(secret: dict | None, ca: pki.KeyPair, *, now: datetime.datetime = NOW) -> str | None:
    return tls_manifests.stage_secret_problem(
        secret,
        ca_pem=ca.cert_pem,
        identity=tls_manifests.stage_identity(REF, "abcd1234", 1),
        hosts=names.stage_hosts(REF, "abcd1234", 1),
        now=now,
        validity=VALIDITY,
    )


@pytest.fixture(scope="module")
def stored(ca: pki.KeyPair) -> pki.KeyPair:
    identity = tls_manifests.stage_identity(REF, "abcd1234", 1)
    hosts = names.stage_hosts(REF, "abcd1234", 1)
    return pki.issue_stage(ca, identity, hosts=hosts, now=NOW, validity=VALIDITY)


def test_a_fresh_stage_secret_is_kept_until_renewal_is_due(
    ca: pki.KeyPair, stored: pki.KeyPair
) -> None:
    secret = stage_secret(ca, stored)
    assert problem(secret, ca) is None
    assert problem(secret, ca, now=NOW + datetime.timedelta(days=19)) is None
    assert "renewal due" in str(problem(secret, ca, now=NOW + datetime.timedelta(days=20)))
    assert "valid from" in str(problem(secret, ca, now=NOW + datetime.timedelta(days=31)))


def test_a_stage_secret_is_reissued_when_missing_foreign_or_for_another_stage(
    ca: pki.KeyPair, stored: pki.KeyPair, leaf: pki.KeyPair
) -> None:
    assert problem(None, ca) == "no certificate yet"
    other_ca = pki.new_ca(namespace="team-a", pipeline="chat", now=NOW, validity=VALIDITY)
    assert "another CA" in str(problem(stage_secret(ca, stored), other_ca))
    assert "another stage" in str(problem(stage_secret(ca, leaf), ca))  # other hosts
    mixed = stage_secret(ca, pki.KeyPair(stored.cert_pem, leaf.key_pem))
    assert "not the certificate's key" in str(problem(mixed, ca))
    broken = stage_secret(ca, stored)
    broken["data"]["tls.crt"] = "bm90IGEgY2VydA=="
    assert "not a PEM certificate" in str(problem(broken, ca))


def test_stage_secret_is_a_tls_secret_owned_by_its_plan_configmap(
    ca: pki.KeyPair, stored: pki.KeyPair
) -> None:
    secret = stage_secret(ca, stored)
    assert secret["type"] == "kubernetes.io/tls"
    assert secret["metadata"]["name"] == "chat-abcd1234-s1-tls"
    assert set(secret["data"]) == {"tls.crt", "tls.key", "ca.crt"}
    (owner,) = secret["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == (
        "ConfigMap",
        "chat-abcd1234-plan",
        "cm-uid",
    )
    ca_secret = tls_manifests.build_ca_secret(REF, ca)
    assert ca_secret["metadata"]["name"] == "chat-llmpipe-ca"
    assert ca_secret["metadata"]["ownerReferences"][0]["kind"] == "LLMPipeline"
    assert tls_manifests.read_ca(ca_secret, pipeline=REF) == ca
    assert tls_manifests.read_ca(None, pipeline=REF) is None


def test_a_ca_secret_the_pipeline_does_not_own_is_not_used(ca: pki.KeyPair) -> None:
    """Planted before the pipeline existed, or left by a deleted pipeline of the same name."""
    planted = tls_manifests.build_ca_secret(REF, ca)
    planted["metadata"]["ownerReferences"] = []
    assert tls_manifests.read_ca(planted, pipeline=REF) is None
    other = names.PipelineRef(name=REF.name, namespace=REF.namespace, uid="another-uid")
    assert tls_manifests.read_ca(tls_manifests.build_ca_secret(other, ca), pipeline=REF) is None
    broken = tls_manifests.build_ca_secret(REF, ca)
    broken["data"]["ca.key"] = tls_manifests.build_ca_secret(
        REF, pki.new_ca(namespace="a", pipeline="b", now=NOW, validity=VALIDITY)
    )["data"]["ca.key"]
    assert tls_manifests.read_ca(broken, pipeline=REF) is None
