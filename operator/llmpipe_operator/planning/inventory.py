"""Inventory: what the nodes offer (memory, compute, bandwidth) and how they are linked.

Parses docs/design.md's cluster file format (already loaded from YAML into a mapping) and
Kubernetes quantities. Pure: no file or API access; `planning.live` builds the same
`Inventory` from live Node objects.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from llmpipe_operator.planning import devices

Tier = Literal["edge", "cloud"]
TIERS: tuple[Tier, ...] = ("edge", "cloud")

DEFAULT_RTT_MS: Mapping[str, float] = {"edge-edge": 2.0, "edge-cloud": 30.0, "cloud-cloud": 0.5}
"""Round-trip times by tier pair when neither the file nor a link says otherwise: a LAN
between edge boxes (~2 ms), a WAN hop to the cloud (~30 ms), a data-centre fabric (~0.5 ms)."""

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1)}
_DECIMAL |= {"k": Decimal(10**3), "M": Decimal(10**6), "G": Decimal(10**9)}
_DECIMAL |= {"T": Decimal(10**12), "P": Decimal(10**15), "E": Decimal(10**18)}
_QUANTITY = re.compile(
    r"^\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]?)\s*$"
)


class InventoryError(ValueError):
    """A cluster description that cannot be used; the message names the node and field."""


def parse_quantity(value: str | int | float) -> int:
    """A Kubernetes quantity (`8Gi`, `512M`, `1.5e9`, `4096`) as a whole number of bytes.

    Fractions of a byte are rounded down: memory a node cannot address is not offered.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a quantity: {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"not a quantity: {value!r}")
        return math.floor(value)
    match = _QUANTITY.match(str(value))
    if not match:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    number, suffix = match.groups()
    try:
        amount = Decimal(number)
    except InvalidOperation as error:
        raise ValueError(f"not a Kubernetes quantity: {value!r}") from error
    scale = Decimal(_BINARY[suffix]) if suffix in _BINARY else _DECIMAL[suffix]
    return math.floor(amount * scale)


def parse_cpu(value: str | int | float) -> float:
    """A CPU quantity (`500m`, `2`, `1.5`) in cores."""
    if isinstance(value, bool):
        raise ValueError(f"not a CPU quantity: {value!r}")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"not a CPU quantity: {value!r}")
        return float(value)
    match = _QUANTITY.match(str(value))
    if not match or match.group(2) in _BINARY:
        raise ValueError(f"not a CPU quantity: {value!r}")
    number, suffix = match.groups()
    return float(Decimal(number) * _DECIMAL[suffix])


@dataclasses.dataclass(frozen=True, kw_only=True)
class Timings:
    """What a stage step costs on a node beyond its weights' and KV cache's bytes, as the
    node probe measured it (`llmpipe.io/measured`; docs/planning.md, "Fixed costs").
    Absent on a node: `cost.default_timings` derives them from its compute figure."""

    layer_seconds: float | None = None
    """f: seconds per decoder layer per step whatever its width (the small ops of a layer:
    norms, rotary, cache writes, attention call, Python dispatch). None: the default."""
    layer_token_seconds: float | None = None
    """g: seconds per decoder layer per token of the micro-batch beyond the products."""
    step_seconds: float | None = None
    """h: seconds per step whatever the layers (the runtime's bookkeeping around them)."""
    hop_seconds: float | None = None
    """m: CPU seconds one message hop costs the node (send + receive of a micro-batch)."""
    products: tuple[tuple[float, float], ...] = ()
    """(tokens, seconds per weight byte) of a decode product of that many tokens over
    weights beyond the caches, by token count; empty: the roofline of the node's figures.
    CPU products do not follow a roofline: a few tokens cost about the same per call."""


TIMING_FIELDS: Mapping[str, str] = {
    "layerStepSeconds": "layer_seconds",
    "layerTokenSeconds": "layer_token_seconds",
    "stepSeconds": "step_seconds",
    "hopSeconds": "hop_seconds",
}
"""The fixed costs' keys in a cluster file node and in `llmpipe.io/measured` -> Timings."""
PRODUCTS_FIELD = "productSecondsPerByte"
"""`{"<tokens>": seconds per weight byte, ...}`: the product curve (`Timings.products`)."""


def read_timings(data: Mapping[str, Any]) -> tuple[Timings | None, list[str]]:
    """(the Timings in `data`, the keys that were present but not usable), one reading for
    the cluster file (which refuses a bad key) and the annotation (which drops it)."""
    bad: list[str] = []
    given: dict[str, Any] = {}
    for key, field in TIMING_FIELDS.items():
        if key in data:
            value = data[key]
            if _finite(value) and value >= 0:
                given[field] = float(value)
            else:
                bad.append(key)
    raw = data.get(PRODUCTS_FIELD)
    if raw is not None:
        points = _products(raw)
        if points is None:
            bad.append(PRODUCTS_FIELD)
        elif points:
            given["products"] = points
    return (Timings(**given) if given else None), bad


def _products(raw: Any) -> tuple[tuple[float, float], ...] | None:
    if not isinstance(raw, Mapping):
        return None
    points = []
    for tokens, rate in raw.items():
        try:
            count = float(tokens)
        except ValueError:
            return None
        if not (math.isfinite(count) and count > 0 and _finite(rate) and rate > 0):
            return None
        points.append((count, float(rate)))
    return tuple(sorted(points))


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Node:
    """One node as the planner sees it."""

    name: str
    tier: Tier
    memory_bytes: int
    """Usable for the pipeline (allocatable minus what is already in use)."""
    tflops: float
    """Effective dense fp16 TFLOP/s."""
    memory_bandwidth_gbps: float
    """GB/s, 1e9 bytes per second."""
    uplink_mbps: float
    """Mbit/s, 1e6 bits per second."""
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    gpu: devices.Gpu | None = None
    """The node's free GPUs (GPU Feature Discovery labels, `planning.devices`); None: CPU
    only. A GPU stage's compute, bandwidth and memory are the GPU's (`cost`)."""
    timings: Timings | None = None
    """Measured fixed costs; None: derived from the compute figure (`cost.default_timings`)."""


LABEL_TIER = "llmpipe.io/tier"
LABEL_TFLOPS = "llmpipe.io/tflops"
LABEL_BANDWIDTH = "llmpipe.io/memory-bandwidth-gbps"
LABEL_UPLINK = "llmpipe.io/uplink-mbps"


@dataclasses.dataclass(frozen=True)
class NodeDefaults:
    """What an unlabelled node is assumed to offer: a modest machine, so plans err safe."""

    tier: Tier = "cloud"
    """Only nodes labelled edge count as edge: `firstStage: edge` is a privacy promise."""
    tflops: float = 1.0
    """About a Jetson-class GPU or a few CPU cores' effective fp16 rate."""
    memory_bandwidth_gbps: float = 50.0
    """A dual-channel DDR4/LPDDR5 board."""
    uplink_mbps: float = 1000.0
    """Gigabit Ethernet, the common wired link."""


def node_facts(
    labels: Mapping[str, str],
    *,
    where: str,
    tflops: float | None,
    memory_bandwidth_gbps: float | None,
    defaults: NodeDefaults,
    allocatable_gpus: int | None = None,
    held_gpus: int = 0,
) -> tuple[float, float, devices.Gpu | None]:
    """(CPU TFLOP/s, CPU GB/s, the GPUs) of a node, the one reading of its figures that the
    cluster file and a live Node share: a given figure (the file's field, else the
    `llmpipe.io/*` label) wins, a GPU falls back on its product's spec sheet, and the CPU
    view on `defaults`."""
    tflops = tflops if tflops is not None else _label(labels, LABEL_TFLOPS, where)
    bandwidth = memory_bandwidth_gbps
    if bandwidth is None:
        bandwidth = _label(labels, LABEL_BANDWIDTH, where)
    try:
        gpu = devices.read_gpu(
            labels,
            where=where,
            tflops=tflops,
            memory_bandwidth_gbps=bandwidth,
            allocatable=allocatable_gpus,
            held=held_gpus,
        )
    except devices.DeviceError as error:
        raise InventoryError(str(error)) from error
    cpu_tflops = tflops if tflops is not None else defaults.tflops
    cpu_bandwidth = bandwidth if bandwidth is not None else defaults.memory_bandwidth_gbps
    return cpu_tflops, cpu_bandwidth, gpu


def _label(labels: Mapping[str, str], key: str, where: str) -> float | None:
    if key not in labels:
        return None
    try:
        value = float(labels[key])
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise InventoryError(f"{where}: label {key} must be a positive number, got {labels[key]!r}")
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class Link:
    """A measured link between two nodes, overriding the uplink/tier defaults (symmetric)."""

    a: str
    b: str
    mbps: float
    rtt_ms: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class Inventory:
    """Nodes, explicit links, and RTT defaults by tier pair."""

    nodes: tuple[Node, ...]
    links: tuple[Link, ...] = ()
    rtt_ms_defaults: Mapping[str, float] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_RTT_MS)
    )
    _by_name: Mapping[str, Node] = dataclasses.field(init=False, repr=False, compare=False)
    _links: Mapping[frozenset[str], Link] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_name: dict[str, Node] = {}
        for index, node in enumerate(self.nodes):
            if node.name in by_name:
                raise InventoryError(f"nodes[{index}] ({node.name}): duplicate node name")
            by_name[node.name] = node
        links: dict[frozenset[str], Link] = {}
        for index, link in enumerate(self.links):
            for end in (link.a, link.b):
                if end not in by_name:
                    raise InventoryError(f"links[{index}]: unknown node {end!r}")
            links[frozenset((link.a, link.b))] = link
        object.__setattr__(self, "_by_name", by_name)
        object.__setattr__(self, "_links", links)

    def node(self, name: str) -> Node:
        return self._by_name[name]

    def link(self, a: str, b: str) -> Link | None:
        return self._links.get(frozenset((a, b)))

    def mbps(self, a: str, b: str) -> float:
        """The `links` entry if any, else the slower of the two uplinks."""
        link = self.link(a, b)
        if link is not None:
            return link.mbps
        return min(self.node(a).uplink_mbps, self.node(b).uplink_mbps)

    def rtt_ms(self, a: str, b: str) -> float:
        """The `links` entry if any, else the default for the two nodes' tiers."""
        link = self.link(a, b)
        if link is not None:
            return link.rtt_ms
        return self.rtt_ms_defaults[tier_pair(self.node(a).tier, self.node(b).tier)]

    def without(self, names: Iterable[str]) -> Inventory:
        """The same cluster without the named nodes (and their links)."""
        gone = set(names)
        return Inventory(
            nodes=tuple(n for n in self.nodes if n.name not in gone),
            links=tuple(k for k in self.links if k.a not in gone and k.b not in gone),
            rtt_ms_defaults=self.rtt_ms_defaults,
        )

    def to_dict(self) -> dict[str, Any]:
        """The cluster file format of docs/design.md (memory in bytes)."""
        return {
            "nodes": [
                {
                    "name": n.name,
                    "tier": n.tier,
                    "memory": n.memory_bytes,
                    "tflops": n.tflops,
                    "memoryBandwidthGBps": n.memory_bandwidth_gbps,
                    "uplinkMbps": n.uplink_mbps,
                    "labels": dict(n.labels),
                    **timings_dict(n.timings),
                }
                for n in self.nodes
            ],
            "links": [{"a": k.a, "b": k.b, "mbps": k.mbps, "rttMs": k.rtt_ms} for k in self.links],
            "rttMs": dict(self.rtt_ms_defaults),
        }


def timings_dict(timings: Timings | None) -> dict[str, Any]:
    """The cluster file's / annotation's keys for `timings` (those set)."""
    if timings is None:
        return {}
    out: dict[str, Any] = {
        key: getattr(timings, field)
        for key, field in TIMING_FIELDS.items()
        if getattr(timings, field) is not None
    }
    if timings.products:
        out[PRODUCTS_FIELD] = {f"{t:g}": r for t, r in timings.products}
    return out


def tier_pair(a: Tier, b: Tier) -> str:
    """`edge-cloud` whichever way round; the key of the RTT defaults."""
    first, second = sorted((a, b), key=TIERS.index)
    return f"{first}-{second}"


_TIER_PAIRS = {f"{a}-{b}": tier_pair(a, b) for a in TIERS for b in TIERS}


def parse_cluster(data: Mapping[str, Any]) -> Inventory:
    """The cluster file of docs/design.md -> Inventory; errors name the node and the field."""
    if not isinstance(data, Mapping):
        raise InventoryError("cluster: expected a mapping with a 'nodes' list")
    raw_nodes = data.get("nodes")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise InventoryError("cluster: 'nodes' must be a non-empty list")
    nodes = tuple(_parse_node(raw, index) for index, raw in enumerate(raw_nodes))
    raw_links = data.get("links") or []
    if not isinstance(raw_links, list):
        raise InventoryError("cluster: 'links' must be a list")
    links = tuple(_parse_link(raw, index) for index, raw in enumerate(raw_links))
    return Inventory(nodes=nodes, links=links, rtt_ms_defaults=_parse_rtt(data.get("rttMs")))


def _parse_node(raw: Any, index: int) -> Node:
    if not isinstance(raw, Mapping):
        raise InventoryError(f"nodes[{index}]: expected a mapping")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise InventoryError(f"nodes[{index}]: field 'name' is missing or not a string")
    where = f"node {name!r}"
    tier = raw.get("tier")
    if tier not in TIERS:
        raise InventoryError(f"{where}: field 'tier' must be edge or cloud, got {tier!r}")
    raw_labels = raw.get("labels") or {}
    if not isinstance(raw_labels, Mapping):
        raise InventoryError(f"{where}: field 'labels' must be a mapping")
    labels = {str(k): str(v) for k, v in raw_labels.items()}
    given = {
        key: _positive_number(raw, key, where) if key in raw else None
        for key in ("tflops", "memoryBandwidthGBps")
    }
    tflops, bandwidth, gpu = node_facts(
        labels,
        where=where,
        tflops=given["tflops"],
        memory_bandwidth_gbps=given["memoryBandwidthGBps"],
        defaults=NodeDefaults(),
    )
    label_of = {"tflops": LABEL_TFLOPS, "memoryBandwidthGBps": LABEL_BANDWIDTH}
    for key, value in given.items():
        if value is None and label_of[key] not in labels and gpu is None:
            raise InventoryError(
                f"{where}: field {key!r} is missing (it may be left out on a GPU node "
                "whose labels name a known product)"
            )
    timings, bad = read_timings(raw)
    if bad:
        raise InventoryError(
            f"{where}: field {bad[0]!r} must be a number >= 0 (a mapping of token counts "
            "to positive seconds per byte for productSecondsPerByte)"
        )
    return Node(
        name=name,
        tier=tier,
        memory_bytes=_positive_quantity(raw, "memory", where),
        tflops=tflops,
        memory_bandwidth_gbps=bandwidth,
        uplink_mbps=_positive_number(raw, "uplinkMbps", where),
        labels=labels,
        gpu=gpu,
        timings=timings,
    )


def _parse_link(raw: Any, index: int) -> Link:
    where = f"links[{index}]"
    if not isinstance(raw, Mapping):
        raise InventoryError(f"{where}: expected a mapping with a, b, mbps, rttMs")
    ends = [raw.get("a"), raw.get("b")]
    for field, end in zip(("a", "b"), ends, strict=True):
        if not isinstance(end, str) or not end:
            raise InventoryError(f"{where}: field {field!r} is missing or not a node name")
    if ends[0] == ends[1]:
        raise InventoryError(f"{where}: a link joins two different nodes, got {ends[0]!r} twice")
    where = f"link {ends[0]}-{ends[1]}"
    return Link(
        a=str(ends[0]),
        b=str(ends[1]),
        mbps=_positive_number(raw, "mbps", where),
        rtt_ms=_number(raw, "rttMs", where, allow_zero=True),
    )


def _parse_rtt(raw: Any) -> dict[str, float]:
    rtt = dict(DEFAULT_RTT_MS)
    if raw is None:
        return rtt
    if not isinstance(raw, Mapping):
        raise InventoryError("cluster: 'rttMs' must map tier pairs (edge-edge, ...) to ms")
    for key, value in raw.items():
        pair = _TIER_PAIRS.get(str(key))
        if pair is None:
            raise InventoryError(f"rttMs: unknown tier pair {key!r} (edge-edge, edge-cloud, ...)")
        rtt[pair] = _checked(value, f"rttMs: {key!r}", allow_zero=True)
    return rtt


def _positive_quantity(raw: Mapping[str, Any], field: str, where: str) -> int:
    if field not in raw:
        raise InventoryError(f"{where}: field {field!r} is missing")
    try:
        value = parse_quantity(raw[field])
    except ValueError as error:
        raise InventoryError(f"{where}: field {field!r}: {error}") from error
    if value <= 0:
        raise InventoryError(f"{where}: field {field!r} must be > 0, got {raw[field]!r}")
    return value


def _positive_number(raw: Mapping[str, Any], field: str, where: str) -> float:
    return _number(raw, field, where, allow_zero=False)


def _number(raw: Mapping[str, Any], field: str, where: str, *, allow_zero: bool) -> float:
    if field not in raw:
        raise InventoryError(f"{where}: field {field!r} is missing")
    return _checked(raw[field], f"{where}: field {field!r}", allow_zero=allow_zero)


def _checked(value: Any, what: str, *, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InventoryError(f"{what} must be a number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise InventoryError(f"{what} must be {bound}, got {value!r}")
    return float(value)
