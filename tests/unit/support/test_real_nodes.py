"""The pure parts of the nodes tier (tests/support/real_nodes.py, cluster_dns.py): the DNS
answers the pods get, the node configurations, and the node tools' pin. No cluster.

The DNS checks decode each reply by hand (RFC 1035 layout), and one sends a real query over
UDP to a served instance on loopback.
"""

from __future__ import annotations

import re
import socket
import struct
from pathlib import Path

import pytest

from tests.support import cluster_dns, real_nodes

REPO = Path(__file__).resolve().parents[3]
SERVICES = {("web", "ns1"): ["10.96.0.20"], ("headless", "ns1"): ["10.245.1.4", "10.245.2.9"]}


def resolve(service: str, namespace: str) -> list[str] | None:
    return SERVICES.get((service, namespace))


def query(name: str, qtype: int = cluster_dns.TYPE_A, ident: int = 0x1234) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return (
        struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0)
        + labels
        + b"\0"
        + struct.pack("!HH", qtype, cluster_dns.CLASS_IN)
    )


def decode(reply: bytes, asked: bytes) -> tuple[int, int, list[str]]:
    """(id, rcode, A addresses) of a reply to `asked`, checking the echoed question."""
    ident, flags, qd, an, _, _ = struct.unpack("!HHHHHH", reply[:12])
    assert flags & 0x8000, "QR set"
    question_end = len(asked)
    if qd:
        assert reply[12:question_end] == asked[12:]
    addresses = []
    offset = question_end if qd else 12
    for _ in range(an):
        pointer, rtype, rclass, _ttl, length = struct.unpack("!HHHIH", reply[offset : offset + 12])
        assert (pointer, rtype, rclass, length) == (0xC00C, 1, 1, 4)
        addresses.append(socket.inet_ntoa(reply[offset + 12 : offset + 16]))
        offset += 16
    assert offset == len(reply)
    return ident, flags & 0xF, addresses


@pytest.mark.parametrize(
    ("name", "qtype", "rcode", "addresses"),
    [
        ("web.ns1.svc.cluster.local", cluster_dns.TYPE_A, 0, ["10.96.0.20"]),
        ("WEB.NS1.svc.cluster.local", cluster_dns.TYPE_A, 0, ["10.96.0.20"]),
        ("headless.ns1.svc.cluster.local", cluster_dns.TYPE_A, 0, ["10.245.1.4", "10.245.2.9"]),
        ("web.ns1.svc.cluster.local", 28, 0, []),  # AAAA: the name exists, no IPv6 record
        ("web.ns2.svc.cluster.local", cluster_dns.TYPE_A, cluster_dns.NXDOMAIN, []),
        # What the resolver tries first for `web.ns1.svc` from a pod in ns1 (ndots 5):
        ("web.ns1.svc.ns1.svc.cluster.local", cluster_dns.TYPE_A, cluster_dns.NXDOMAIN, []),
        ("pypi.org", cluster_dns.TYPE_A, cluster_dns.NXDOMAIN, []),
    ],
)
def test_answers(name: str, qtype: int, rcode: int, addresses: list[str]) -> None:
    asked = query(name, qtype)
    ident, got_rcode, got = decode(cluster_dns.answer(asked, resolve), asked)
    assert (ident, got_rcode, got) == (0x1234, rcode, addresses)


def test_a_malformed_query_gets_formerr() -> None:
    ident, rcode, _ = decode(cluster_dns.answer(b"\x43\x21\x01", resolve), b"")
    assert (ident, rcode) == (0x4321, cluster_dns.FORMERR)


def test_served_over_udp() -> None:
    server = cluster_dns.ClusterDNS("127.0.0.1", resolve, port=0).start()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            asked = query("web.ns1.svc.cluster.local", ident=7)
            sock.sendto(asked, ("127.0.0.1", server.port))
            assert decode(sock.recv(512), asked) == (7, 0, ["10.96.0.20"])
    finally:
        server.stop()


def test_each_node_has_its_own_addresses_ports_and_dirs(tmp_path: Path) -> None:
    a = real_nodes.RealNode.plan("real-a", 1, tmp_path)
    b = real_nodes.RealNode.plan("real-b", 2, tmp_path)
    assert (a.node_ip, a.pod_subnet, a.bridge) != (b.node_ip, b.pod_subnet, b.bridge)
    a.ports = {"kubelet": 1, "kubelet-healthz": 2}
    config = a.kubelet_config()
    assert config["address"] == a.node_ip
    assert config["clusterDNS"] == [real_nodes.DNS_ADDRESS]
    assert str(tmp_path / "real-a") in config["containerRuntimeEndpoint"]
    containerd = a.containerd_config("localhost/llmpipe-pause:x")
    assert f'root = "{tmp_path / "real-a" / "containerd" / "root"}"' in containerd
    assert 'sandbox_image = "localhost/llmpipe-pause:x"' in containerd
    assert a.cni_conflist()["plugins"][0]["ipam"]["ranges"] == [[{"subnet": "10.245.1.0/24"}]]


def kubernetes_pin(module: str) -> tuple[str, list[str]]:
    text = (REPO / "tools" / module / "go.mod").read_text()
    version = re.search(r"^\s*k8s\.io/kubernetes (v\S+)", text, re.M)
    assert version, module
    replaces = sorted(re.findall(r"^\s*(k8s\.io/\S+ => \S+ \S+)", text, re.M))
    return version.group(1), replaces


def test_node_tools_pin_the_control_planes_kubernetes_release() -> None:
    assert kubernetes_pin("kubernetes-node") == kubernetes_pin("kubernetes")
