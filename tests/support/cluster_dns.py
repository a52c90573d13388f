"""A minimal cluster DNS for the real nodes of the test cluster (tests/support/real_nodes.py).

No CoreDNS image can be pulled here (no registry) and none is built from the pinned Go
modules, so this stands in for it: a UDP DNS server on one local address that answers
what pods ask of cluster DNS, from the API server:

- `<service>.<namespace>.svc.cluster.local` A -> the Service's ClusterIP, or, for a
  headless Service, the addresses of its ready EndpointSlice endpoints;
- any other type for such a name -> NOERROR with no answer (so AAAA lookups end at once);
- anything else -> NXDOMAIN (pods here need no outside names; the resolver's search list
  turns `stage.ns.svc` into `stage.ns.svc.cluster.local` after a few misses).

The kubelets hand it to pods as `clusterDNS`. Record types, TCP, recursion and caching are
left out; the answers are never older than one API read (TTL 5 s).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable

from lightkube import ApiError, Client
from lightkube.resources.core_v1 import Service
from lightkube.resources.discovery_v1 import EndpointSlice

CLUSTER_DOMAIN = "cluster.local"
TYPE_A = 1
CLASS_IN = 1
NXDOMAIN = 3
FORMERR = 1
TTL = 5

Resolver = Callable[[str, str], list[str] | None]
"""(service, namespace) -> IPv4 addresses, or None when no such Service exists."""


def parse_question(packet: bytes) -> tuple[int, int, str, int, int]:
    """(id, flags, name, qtype, end offset of the question) of a one-question query."""
    ident, flags, qdcount = struct.unpack("!HHH", packet[:6])
    if qdcount != 1:
        raise ValueError("one question per query")
    labels, offset = [], 12
    while True:
        length = packet[offset]
        if length & 0xC0:
            raise ValueError("compressed names in a question")
        offset += 1
        if length == 0:
            break
        labels.append(packet[offset : offset + length].decode("ascii").lower())
        offset += length
    qtype, _qclass = struct.unpack("!HH", packet[offset : offset + 4])
    return ident, flags, ".".join(labels), qtype, offset + 4


def service_of(name: str) -> tuple[str, str] | None:
    """("svc", "ns") for `svc.ns.svc.cluster.local`, else None."""
    suffix = f".svc.{CLUSTER_DOMAIN}"
    if not name.endswith(suffix):
        return None
    parts = name[: -len(suffix)].split(".")
    return (parts[0], parts[1]) if len(parts) == 2 else None


def answer(packet: bytes, resolve: Resolver) -> bytes:
    """The response to one query packet."""
    try:
        ident, flags, name, qtype, end = parse_question(packet)
    except (ValueError, IndexError, UnicodeDecodeError, struct.error):
        ident = struct.unpack("!H", packet[:2])[0] if len(packet) >= 2 else 0
        return struct.pack("!HHHHHH", ident, 0x8000 | FORMERR, 0, 0, 0, 0)
    wanted = service_of(name)
    addresses = resolve(*wanted) if wanted else None
    # QR, the query's opcode and RD, AA (we own cluster.local), RA.
    reply_flags = 0x8000 | (flags & 0x7900) | 0x0400 | 0x0080
    if addresses is None:
        return struct.pack("!HHHHHH", ident, reply_flags | NXDOMAIN, 1, 0, 0, 0) + packet[12:end]
    records = [ip for ip in addresses if qtype == TYPE_A]
    head = struct.pack("!HHHHHH", ident, reply_flags, 1, len(records), 0, 0)
    body = b"".join(
        struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, TTL, 4) + socket.inet_aton(ip)
        for ip in records
    )
    return head + packet[12:end] + body


def api_resolver(client: Client) -> Resolver:
    def resolve(service: str, namespace: str) -> list[str] | None:
        try:
            found = client.get(Service, service, namespace=namespace)
        except ApiError as error:
            if error.status.code == 404:
                return None
            raise
        ip = found.spec.clusterIP if found.spec else None
        if ip and ip != "None":
            return [ip]
        slices = client.list(
            EndpointSlice,
            namespace=namespace,
            labels={"kubernetes.io/service-name": service},
        )
        return [
            address
            for piece in slices
            for endpoint in piece.endpoints or []
            if endpoint.conditions is None or endpoint.conditions.ready is not False
            for address in endpoint.addresses
        ]

    return resolve


class ClusterDNS:
    """`ClusterDNS(address, client).start()` serves until `stop()`; a daemon thread."""

    def __init__(self, address: str, resolve: Resolver, *, port: int = 53) -> None:
        self.address = address
        self.resolve = resolve
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((address, port))
        self.port = int(self.sock.getsockname()[1])
        self.queries = 0
        self._thread = threading.Thread(target=self._serve, name="cluster-dns", daemon=True)
        self._stopping = threading.Event()

    def start(self) -> ClusterDNS:
        self._thread.start()
        return self

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                packet, peer = self.sock.recvfrom(512)
            except OSError:
                return
            if peer is None or self._stopping.is_set():  # shut down while waiting
                return
            self.queries += 1
            try:
                reply = answer(packet, self.resolve)
            except Exception:  # noqa: BLE001 - an API hiccup must not end the server: SERVFAIL
                reply = packet[:2] + struct.pack("!HHHHH", 0x8182, 0, 0, 0, 0)
            with contextlib.suppress(OSError):
                self.sock.sendto(reply, peer)

    def stop(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(timeout=5)
