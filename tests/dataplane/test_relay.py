"""The delaying TCP relay (tests/support/relay.py) that emulates round-trip time between
stages: bytes cross it intact and in order in both directions, a ping-pong takes at least
the configured round trip (a lower bound only: an upper bound would fail on a busy
machine), and a pipeline whose stages reach each other only through relays still decodes
exactly what single-process `generate` does. The same in an emulated cluster (root only):
a relay process inside a node's namespace, behind its `tc tbf`-shaped veth, delays a
ping-pong from the other node by at least the round trip (after its delay is changed too),
and a pipeline whose stages run in two nodes behind such relays decodes exactly."""

from __future__ import annotations

import random
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dataplane import pipelines
from tests.support import emulated, relay

TWO_NODES = {
    "nodes": [
        {"name": "a", "cpus": 0.5, "memory": "2Gi", "tier": "edge"},
        {"name": "b", "cpus": 0.5, "memory": "2Gi", "tier": "edge"},
    ],
    "defaultMbps": 8,
}


@pytest.fixture
def cluster() -> Iterator[emulated.Cluster]:
    reason = emulated.available()
    if reason:
        pytest.skip(f"cannot emulate a cluster here: {reason}")
    built = emulated.Cluster.start(TWO_NODES)
    yield built
    built.stop()


def test_bytes_cross_intact_and_in_order_both_ways() -> None:
    payload = random.Random(7).randbytes(3 << 20)  # 3 MiB: many chunks, many reads
    with (
        relay.echo_server() as target,
        relay.relays([target], one_way_ms=5) as (front,),
        socket.create_connection(("127.0.0.1", front.port), timeout=30) as conn,
    ):
        received = bytearray()

        def read() -> None:
            while len(received) < len(payload):
                chunk = conn.recv(1 << 16)
                if not chunk:
                    return
                received.extend(chunk)

        reader = threading.Thread(target=read)
        reader.start()
        for offset in range(0, len(payload), 10_007):  # odd sizes, sent back to back
            conn.sendall(payload[offset : offset + 10_007])
        reader.join(60)
    assert bytes(received) == payload


def test_end_of_stream_is_forwarded_after_the_data() -> None:
    with (
        relay.echo_server() as target,
        relay.relays([target], one_way_ms=20) as (front,),
        socket.create_connection(("127.0.0.1", front.port), timeout=30) as conn,
    ):
        conn.sendall(b"last words")
        conn.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := conn.recv(100):
            got += chunk
    assert got == b"last words"


@pytest.mark.parametrize("rtt_ms", [10, 30])
def test_ping_pong_takes_at_least_the_round_trip(rtt_ms: float) -> None:
    seconds = relay.ping_pong(rtt_ms, rounds=20)
    assert len(seconds) == 20
    assert min(seconds) >= rtt_ms / 1000 * 0.999  # timers never fire early


def test_pipeline_through_relays_decodes_exactly(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    prompts = [[5, 6, 7, 8, 9] * 3, [11, 12, 13, 40]]
    expected = pipelines.reference_tokens(model_dirs["llama-gqa"], prompts, [8, 8])
    fronts: list[relay.Relay] = []

    def via(address: str) -> str:
        host, port = address.rsplit(":", 1)
        fronts.append(relay.Relay((host, int(port)), one_way_ms=5).start())
        return fronts[-1].address

    pipeline = None
    try:
        pipeline = pipelines.Pipeline.start(
            model_dirs["llama-gqa"],
            tmp_path,
            stages=2,
            plaintext=True,
            peer_address=via,
            workload={"speculation": "ngram"},
        )
        assert len(fronts) == 2
        for prompt, want in zip(prompts, expected, strict=True):
            assert pipelines.complete(pipeline, prompt, 8) == want
    finally:
        if pipeline is not None:
            pipeline.stop()
        for front in fronts:
            front.stop()


def test_relay_process_in_a_namespace_delays_across_the_shaped_link(
    cluster: emulated.Cluster,
) -> None:
    near, far = cluster.nodes
    with relay.echo_process(far.address, prefix=cluster.network_prefix(far)) as echo:
        front = relay.RelayProcess(
            echo, host=far.address, one_way_ms=10, prefix=cluster.network_prefix(far)
        )
        try:
            to = (far.address, front.port)
            prefix = cluster.network_prefix(near)
            assert min(relay.ping_from(to, rounds=5, prefix=prefix)) >= 0.020 * 0.999
            front.delay = 0.020  # one way: now a 40 ms round trip
            assert min(relay.ping_from(to, rounds=5, prefix=prefix, size=5000)) >= 0.040 * 0.999
        finally:
            front.stop()


def test_pipeline_through_relays_in_namespaces_decodes_exactly(
    cluster: emulated.Cluster, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    prompts = [[5, 6, 7, 8, 9] * 3, [11, 12, 13, 40]]
    expected = pipelines.reference_tokens(model_dirs["llama-gqa"], prompts, [8, 8])
    fronts: list[relay.RelayProcess] = []

    def via(address: str) -> str:
        host, port = address.rsplit(":", 1)
        node = next(n for n in cluster.nodes if n.address == host)
        fronts.append(
            relay.RelayProcess(
                (host, int(port)), host=host, one_way_ms=5, prefix=cluster.network_prefix(node)
            )
        )
        return fronts[-1].address

    pipeline = None
    try:
        pipeline = pipelines.Pipeline.start(
            model_dirs["llama-gqa"],
            tmp_path,
            stages=2,
            plaintext=True,
            hosts=[node.address for node in cluster.nodes],
            prefixes=[node.prefix() for node in cluster.nodes],
            peer_address=via,
            workload={"speculation": "ngram", "prefillChunkTokens": 4},
        )
        assert [front.host for front in fronts] == [node.address for node in cluster.nodes]
        for prompt, want in zip(prompts, expected, strict=True):
            assert pipelines.complete(pipeline, prompt, 8) == want
    finally:
        if pipeline is not None:
            pipeline.stop()
        for front in fronts:
            front.stop()
