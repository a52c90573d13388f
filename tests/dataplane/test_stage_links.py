"""Authenticated stage links on real stage processes (mutual TLS, per-RPC identity checks).

Covers: a client without the pipeline's certificate (plaintext, TLS without a client
certificate, a certificate of another CA) cannot call any RPC; a stage of pipeline A cannot
call a stage of pipeline B; each RPC is taken only from the stage that may send it, so a
forged `ReturnTokens` from a valid stage certificate that is not the last stage is refused
and the victim's greedy stream stays exact; `Info` from a peer other than stage 0 is
refused (no sequence ids); swapping the certificate files of running stages (a rotation,
here to a whole new CA) takes effect on new connections without a restart and the
pipeline keeps serving, with the stages' outgoing channels using the new files too.
"""

from __future__ import annotations

import datetime
import http.client
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from llmpipe_common import pki
from llmpipe_stage import tls
from llmpipe_stage.proto import stage_pb2, stage_pb2_grpc
from tests.dataplane import pipelines

PROMPT = [5, 6, 7, 8]
LONG = 60

RPCS = {
    "Forward": stage_pb2.Activations(),
    "ReturnTokens": stage_pb2.Tokens(sequence_ids=[1], token_ids=[7]),
    "Fail": stage_pb2.Failure(sequence_ids=[1], stage_index=2, reason="forged"),
    "ReleaseSequences": stage_pb2.Release(sequence_ids=[1]),
    "Info": stage_pb2.InfoRequest(),
}


def call(channel: grpc.Channel, rpc: str) -> object:
    return getattr(stage_pb2_grpc.StageStub(channel), rpc)(RPCS[rpc], timeout=5)


def code_of(channel: grpc.Channel, rpc: str, message: object | None = None) -> grpc.StatusCode:
    stub = stage_pb2_grpc.StageStub(channel)
    try:
        getattr(stub, rpc)(RPCS[rpc] if message is None else message, timeout=5)
    except grpc.RpcError as error:
        return error.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@pytest.fixture(scope="module")
def pipeline(model_dirs: dict[str, Path], start_pipeline) -> pipelines.Pipeline:
    return start_pipeline(model_dirs["llama-gqa"], stages=3, max_context=256, name="alpha")


@pytest.fixture(scope="module")
def other(model_dirs: dict[str, Path], start_pipeline) -> pipelines.Pipeline:
    return start_pipeline(model_dirs["llama-gqa"], stages=2, max_context=256, name="beta")


@pytest.fixture(scope="module")
def expected(model_dirs: dict[str, Path]) -> list[int]:
    return pipelines.reference_tokens(model_dirs["llama-gqa"], [PROMPT], [LONG])[0]


def address(pipeline: pipelines.Pipeline, index: int) -> str:
    return f"127.0.0.1:{pipeline.grpc_ports[index]}"


def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(str(c["choices"][0]["text"]) for c in chunks if c.get("choices"))


def stream(pipeline: pipelines.Pipeline, *, max_tokens: int) -> Iterator[dict[str, Any]]:
    connection = http.client.HTTPConnection("127.0.0.1", pipeline.http_ports[0], timeout=60)
    body = {"model": "alpha", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    connection.request(
        "POST",
        "/v1/completions",
        json.dumps({**body, "stream": True, "ignore_eos": True}),
        {"Content-Type": "application/json"},
    )
    response = connection.getresponse()
    assert response.status == 200, response.read()
    try:
        while line := response.readline():
            line = line.strip()
            if line.startswith(b"data: {"):
                yield json.loads(line.removeprefix(b"data: "))
    finally:
        connection.close()


def completion(pipeline: pipelines.Pipeline, *, max_tokens: int) -> dict[str, Any]:
    status, body = pipelines.http_json(
        f"{pipeline.base_url}/v1/completions",
        {
            "model": "alpha",
            "prompt": PROMPT,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        },
    )
    assert status == 200, body
    return body


@pytest.mark.parametrize("rpc", sorted(RPCS))
def test_a_client_without_the_pipelines_certificate_cannot_call_any_rpc(
    pipeline: pipelines.Pipeline, other: pipelines.Pipeline, rpc: str
) -> None:
    material = tls.TlsFiles(other.tls_dir(0)).material
    for index in range(pipeline.num_stages):
        target = address(pipeline, index)
        with grpc.insecure_channel(target) as plaintext:
            assert code_of(plaintext, rpc) == grpc.StatusCode.UNAVAILABLE
        anonymous = grpc.ssl_channel_credentials(root_certificates=material.ca_pem)
        with grpc.secure_channel(target, anonymous) as channel:
            assert code_of(channel, rpc) == grpc.StatusCode.UNAVAILABLE
        # The right server CA (so the client trusts the stage) but no client certificate.
        own_ca = tls.TlsFiles(pipeline.tls_dir(0)).material.ca_pem
        with grpc.secure_channel(target, grpc.ssl_channel_credentials(own_ca)) as channel:
            assert code_of(channel, rpc) == grpc.StatusCode.UNAVAILABLE


def test_the_handshake_itself_refuses_a_client_without_a_certificate(
    pipeline: pipelines.Pipeline,
) -> None:
    """Below gRPC: the TLS server asks for a client certificate and ends the handshake."""
    context = ssl.create_default_context(cafile=str(pipeline.tls_dir(1) / "ca.crt"))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", pipeline.grpc_ports[1]), timeout=5) as raw,
        pytest.raises((ssl.SSLError, ConnectionError)),
        context.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
    ):
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        if not sock.recv(1):  # TLS 1.3: the refusal comes after the handshake
            raise ConnectionError("closed")


@pytest.mark.parametrize("rpc", sorted(RPCS))
def test_a_stage_of_another_pipeline_cannot_call_any_rpc(
    pipeline: pipelines.Pipeline, other: pipelines.Pipeline, rpc: str
) -> None:
    # beta's stage 0, which is allowed everything stage 0 may send inside beta.
    for index in range(pipeline.num_stages):
        material = tls.TlsFiles(other.tls_dir(0)).material
        # Trust alpha's CA for the server side so only the client certificate is foreign.
        alpha_ca = tls.TlsFiles(pipeline.tls_dir(0)).material.ca_pem
        credentials = grpc.ssl_channel_credentials(
            root_certificates=alpha_ca,
            private_key=material.key_pem,
            certificate_chain=material.cert_pem,
        )
        with grpc.secure_channel(address(pipeline, index), credentials) as channel:
            assert code_of(channel, rpc) == grpc.StatusCode.UNAVAILABLE, (rpc, index)


def test_a_certificate_naming_another_pipeline_is_refused_even_from_the_same_ca(
    pipeline: pipelines.Pipeline, tmp_path: Path
) -> None:
    """Defence in depth: the identity, not only the CA, must be this pipeline's plan."""
    now = datetime.datetime.now(datetime.UTC)
    stranger = pki.StageIdentity("local", "intruder", "local", 0)
    issued = pki.issue_stage(
        pipeline.ca, stranger, hosts=("127.0.0.1",), now=now, validity=pki.Validity()
    )
    tls.write_tls_dir(tmp_path / "stranger", pipeline.ca.cert_pem, issued)
    material = tls.TlsFiles(tmp_path / "stranger").material
    with (
        grpc.secure_channel(address(pipeline, 1), tls.channel_credentials(material)) as channel,
        pytest.raises(grpc.RpcError) as raised,
    ):
        call(channel, "Info")
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "is not a stage of" in raised.value.details()


who_may_not = pytest.mark.parametrize(
    ("rpc", "target", "caller"),
    [
        ("Forward", 2, 0),  # skips stage 1
        ("Forward", 1, 2),
        ("Forward", 2, 2),
        ("ReturnTokens", 0, 1),  # a middle stage posing as the last one
        ("ReturnTokens", 0, 0),
        ("Fail", 0, 1),  # stage 1 reporting as stage 2
        ("Fail", 0, 0),
        ("ReleaseSequences", 1, 2),
        ("ReleaseSequences", 2, 1),
        ("Info", 1, 2),
        ("Info", 2, 1),
        ("Info", 0, 2),
    ],
)


@who_may_not
def test_each_rpc_only_from_the_stage_that_may_send_it(
    pipeline: pipelines.Pipeline, rpc: str, target: int, caller: int
) -> None:
    with (
        pipeline.channel(target, as_stage=caller) as channel,
        pytest.raises(grpc.RpcError) as raised,
    ):
        call(channel, rpc)
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED, raised.value.details()


def test_the_stages_that_may_send_an_rpc_are_served(pipeline: pipelines.Pipeline) -> None:
    """The same calls from the right peers pass authorization (and then the usual checks)."""
    with pipeline.channel(2, as_stage=1) as channel:  # empty Forward: a validation error
        assert code_of(channel, "Forward") == grpc.StatusCode.INVALID_ARGUMENT
    with pipeline.channel(0, as_stage=2) as channel:  # unknown sequence ids are ignored
        assert code_of(channel, "ReturnTokens") == grpc.StatusCode.OK
        assert code_of(channel, "Fail") == grpc.StatusCode.OK
    with pipeline.channel(0, as_stage=1) as channel:
        failure = stage_pb2.Failure(sequence_ids=[1], stage_index=1, reason="neighbour down")
        assert code_of(channel, "Fail", failure) == grpc.StatusCode.OK
    for index in (1, 2):
        with pipeline.channel(index, as_stage=0) as channel:
            assert code_of(channel, "ReleaseSequences") == grpc.StatusCode.OK
            assert code_of(channel, "Info") == grpc.StatusCode.OK


def test_forged_tokens_from_a_middle_stage_leave_the_victims_stream_exact(
    pipeline: pipelines.Pipeline, expected: list[int]
) -> None:
    """The attack of the issue: a valid stage certificate that is not the last stage's
    injects tokens (and a failure) for a victim's live sequence; both are refused."""
    victim = stream(pipeline, max_tokens=LONG)
    first = next(victim)
    live: list[int] = []
    deadline = time.monotonic() + 10
    while not live and time.monotonic() < deadline:
        live = list(pipeline.info(0).cached_sequence_ids)  # the test's own stage-0 view
    assert live, "the victim's sequence never showed up on stage 0"
    refused = []
    with pipeline.channel(0, as_stage=1) as channel:
        stub = stage_pb2_grpc.StageStub(channel)
        for _ in range(20):
            for forged in (
                lambda: stub.ReturnTokens(
                    stage_pb2.Tokens(sequence_ids=live, token_ids=[7] * len(live)), timeout=5
                ),
                lambda: stub.Fail(
                    stage_pb2.Failure(sequence_ids=live, stage_index=2, reason="pwned"),
                    timeout=5,
                ),
            ):
                with pytest.raises(grpc.RpcError) as raised:
                    forged()
                refused.append(raised.value.code())
    with pipeline.channel(1, as_stage=2) as channel:  # and no one but stage 0 frees caches
        assert code_of(channel, "ReleaseSequences", stage_pb2.Release(sequence_ids=live)) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
    rest = list(victim)
    assert set(refused) == {grpc.StatusCode.PERMISSION_DENIED}
    assert not any("error" in chunk for chunk in rest), rest[-1]
    assert text_of([first, *rest]) == completion(pipeline, max_tokens=LONG)["choices"][0]["text"]
    reference = completion(pipeline, max_tokens=LONG)
    assert_exact(reference, expected)


def assert_exact(body: dict[str, Any], expected: list[int]) -> None:
    """The completion's token ids (EOS ignored) start with single-process `generate`'s,
    which stops at EOS (or runs the whole length)."""
    ids = list(body["choices"][0]["token_ids"])
    assert len(ids) == LONG
    assert ids[: len(expected)] == expected


def test_info_from_a_peer_other_than_stage_0_exposes_no_sequence_ids(
    pipeline: pipelines.Pipeline,
) -> None:
    victim = stream(pipeline, max_tokens=LONG)
    next(victim)
    try:
        assert pipeline.info(1, as_stage=0).cached_sequence_ids  # stage 0 sees them
        for target, caller in ((1, 2), (2, 1), (0, 1), (0, 2)):
            with pytest.raises(grpc.RpcError) as raised:
                pipeline.info(target, as_stage=caller)
            assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "sequence" not in (raised.value.details() or "")
    finally:
        for _ in victim:
            pass


def server_certificate(pipeline: pipelines.Pipeline, index: int, *, as_stage: int) -> bytes:
    """The certificate stage `index` presents on a new TLS connection (DER)."""
    context = ssl.create_default_context(cafile=str(pipeline.tls_dir(as_stage) / "ca.crt"))
    context.load_cert_chain(
        pipeline.tls_dir(as_stage) / "tls.crt", pipeline.tls_dir(as_stage) / "tls.key"
    )
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", pipeline.grpc_ports[index]), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
    ):
        der = sock.getpeercert(binary_form=True)
    assert der is not None
    return der


def pem_to_der(pem: bytes) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.decode())


def write_ca(pipeline: pipelines.Pipeline, ca_pem: bytes) -> None:
    for index in range(pipeline.num_stages):
        path = pipeline.tls_dir(index) / "ca.crt"
        temp = path.with_suffix(".new")
        temp.write_bytes(ca_pem)
        temp.replace(path)


def settle(pipeline: pipelines.Pipeline) -> None:
    """Past the files' check interval, then one new handshake per stage (which reloads)."""
    time.sleep(tls.CHECK_INTERVAL_S + 0.5)
    for index in range(pipeline.num_stages):
        server_certificate(pipeline, index, as_stage=0)


def test_swapping_the_certificate_files_rotates_without_a_restart(
    pipeline: pipelines.Pipeline, expected: list[int], tmp_path: Path
) -> None:
    """A rotation to a new CA, done the safe way on the running stages' files: trust both
    CAs, swap every stage's certificate (while a request streams), then trust only the new
    CA. The stream finishes exact; new connections get the new certificates; the old ones
    no longer get in; and after a restart of stage 2 its neighbours dial it anew, which
    only works if their outgoing channels took the new files too."""
    old = tmp_path / "old"
    for index in range(pipeline.num_stages):  # keep the old files for the negative check
        old_dir = old / f"stage-{index}"
        old_dir.mkdir(parents=True)
        for name in tls.FILES:
            (old_dir / name).write_bytes((pipeline.tls_dir(index) / name).read_bytes())
    old_ca = (old / "stage-0" / "ca.crt").read_bytes()
    now = datetime.datetime.now(datetime.UTC)
    new_ca = pki.new_ca(namespace="local", pipeline="alpha", now=now, validity=pki.Validity())
    # 1. trust both CAs
    write_ca(pipeline, old_ca + new_ca.cert_pem)
    settle(pipeline)
    # 2. new certificates for every stage, while a request streams
    victim = stream(pipeline, max_tokens=LONG)
    first = next(victim)
    collected: list[dict[str, Any]] = []
    reader = threading.Thread(target=lambda: collected.extend(victim))
    reader.start()
    issued = []
    for index in range(pipeline.num_stages):
        identity = pki.identity_of((old / f"stage-{index}" / "tls.crt").read_bytes())
        pair = pki.issue_stage(
            new_ca, identity, hosts=("127.0.0.1",), now=now, validity=pki.Validity()
        )
        tls.write_tls_dir(pipeline.tls_dir(index), old_ca + new_ca.cert_pem, pair)
        issued.append(pair)
    reader.join(timeout=60)
    assert not reader.is_alive()
    assert not any("error" in chunk for chunk in collected), collected[-1:]
    assert (
        text_of([first, *collected]) == completion(pipeline, max_tokens=LONG)["choices"][0]["text"]
    )
    settle(pipeline)
    for index in range(pipeline.num_stages):
        assert server_certificate(pipeline, index, as_stage=0) == pem_to_der(issued[index].cert_pem)
    # 3. trust only the new CA: the old certificates no longer get in
    write_ca(pipeline, new_ca.cert_pem)
    settle(pipeline)
    pipeline.ca = new_ca
    old_material = tls.TlsFiles(old / "stage-0").material
    for index in range(pipeline.num_stages):
        with grpc.secure_channel(
            address(pipeline, index), tls.channel_credentials(old_material)
        ) as channel:
            assert code_of(channel, "Info") == grpc.StatusCode.UNAVAILABLE
    # Stage 2 restarts: stage 1 (Forward) dials it anew, and the restarted stage 2 dials
    # stage 0 (ReturnTokens); both handshakes need the new files on the client side.
    pipeline.processes[2].terminate()
    pipeline.processes[2].wait(timeout=15)
    pipeline.spawn(2)
    pipeline.wait_ready(120)
    assert_exact(completion(pipeline, max_tokens=LONG), expected)


def kubelet_layout(root: Path, version: str, ca_pem: bytes, pair: pki.KeyPair) -> None:
    """Write the files the way the kubelet's atomic writer does for a Secret volume: a
    timestamped dir, `..data` pointing at it, and each key a symlink through `..data`;
    an update is a new dir and one rename of the `..data` symlink."""
    tls.write_tls_dir(root / version, ca_pem, pair)
    link = root / "..data_tmp"
    link.symlink_to(version)
    link.rename(root / "..data")
    for name in tls.FILES:
        if not (root / name).is_symlink():
            (root / name).symlink_to(Path("..data") / name)


def test_a_renewed_secret_volume_is_taken_whole_and_a_half_written_set_is_not(
    tmp_path: Path,
) -> None:
    now = datetime.datetime.now(datetime.UTC)
    ca = pki.new_ca(namespace="ns", pipeline="p", now=now, validity=pki.Validity())
    identity = pki.StageIdentity("ns", "p", "abc", 1)
    first, second, third = (
        pki.issue_stage(ca, identity, hosts=("s1",), now=now, validity=pki.Validity())
        for _ in range(3)
    )
    kubelet_layout(tmp_path, "..2026_12_01_a", ca.cert_pem, first)
    files = tls.TlsFiles(tmp_path)
    assert files.material.cert_pem == first.cert_pem
    assert not files.refresh(force=True)  # nothing changed

    kubelet_layout(tmp_path, "..2026_12_01_b", ca.cert_pem, second)  # the kubelet's swap
    assert files.refresh(force=True)
    assert (files.generation, files.material.cert_pem) == (1, second.cert_pem)

    # A writer that replaces files one by one: new certificate, old key -> not taken yet.
    plain = tmp_path / "plain"
    tls.write_tls_dir(plain, ca.cert_pem, first)
    files = tls.TlsFiles(plain)
    (plain / "tls.crt").write_bytes(third.cert_pem)
    assert not files.refresh(force=True)
    assert files.material.cert_pem == first.cert_pem
    (plain / "tls.key").write_bytes(third.key_pem)
    assert files.refresh(force=True)
    assert files.material.cert_pem == third.cert_pem

    # Files naming another stage are refused: a process never changes who it is.
    other = pki.issue_stage(
        ca, pki.StageIdentity("ns", "p", "abc", 2), hosts=("s2",), now=now, validity=pki.Validity()
    )
    tls.write_tls_dir(plain, ca.cert_pem, other)
    assert not files.refresh(force=True)
    assert files.material.identity == identity
