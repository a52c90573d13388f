"""Live inventory: Kubernetes Node objects (plain dicts) -> the planner's `Inventory`.

Pure: takes the node dicts `k8s` listed and, optionally, the memory usage metrics.k8s.io
reported; returns the eligible nodes plus, for every node left out, the reason. No API
calls. The facts come from the node (docs/design.md):

- tier, TFLOP/s, memory bandwidth, uplink: the `llmpipe.io/*` labels; where a label is
  absent, the node probe's figure from the `llmpipe.io/measured` annotation (labels win,
  measurement fills gaps: `planning.measured`); with neither, the defaults below (a GPU:
  its product's spec sheet, `planning.devices`), so an unlabelled, unmeasured cluster
  still plans, conservatively;
- GPUs: the GPU Feature Discovery labels (`planning.devices`), at most
  `status.allocatable["nvidia.com/gpu"]`, less the GPUs other pods (and other pipelines'
  planned GPU stages) hold there;
- memory: `status.allocatable.memory` minus what others hold there: the larger of the
  memory requests of the pods on the node (every pod but this pipeline's own, plus the
  stages other pipelines were planned but whose pods do not exist yet; `held_memory`)
  and the usage metrics.k8s.io reports, if served;
- links: the `llmpipe.io/links` annotation, JSON `{"<peer>": {"mbps": 940, "rttMs": 0.4}}`.

A node is eligible when it is Ready, schedulable, matches the pipeline's nodeSelector, is
not excluded by name, and every NoSchedule/NoExecute taint on it is tolerated.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from llmpipe_operator.planning import devices, inventory, measured

LABEL_TIER = inventory.LABEL_TIER
LABEL_TFLOPS = inventory.LABEL_TFLOPS
LABEL_BANDWIDTH = inventory.LABEL_BANDWIDTH
LABEL_UPLINK = inventory.LABEL_UPLINK
ANNOTATION_LINKS = "llmpipe.io/links"

NodeDefaults = inventory.NodeDefaults
DEFAULTS = NodeDefaults()


@dataclasses.dataclass(frozen=True)
class Eligibility:
    """Which nodes the pipeline may use (the CRD's `spec.placement`, minus layout rules)."""

    node_selector: Mapping[str, str] = dataclasses.field(default_factory=dict)
    exclude_nodes: frozenset[str] = frozenset()
    tolerates: Callable[[Mapping[str, Any]], bool] = lambda _taint: False
    """True when the pipeline's tolerations cover this taint."""


@dataclasses.dataclass(frozen=True)
class LiveInventory:
    inventory: inventory.Inventory
    excluded: Mapping[str, str]
    """Node name -> why it is not eligible (for status messages and Events)."""
    notes: tuple[str, ...] = ()
    """Problems that did not exclude a node (e.g. a malformed links annotation)."""
    holdings: NodeHoldings | None = None
    """What others hold on the nodes (set by the caller that read the pods)."""
    full: frozenset[str] = frozenset()
    """Nodes left out only because others hold all their memory."""
    time_factors: Mapping[str, float] = dataclasses.field(default_factory=dict)
    """node -> the measured time factor its figures were divided by (`planning.speed`)."""

    def held_on_candidates(self) -> str:
        """Who holds memory on the nodes the pipeline may use (eligible or full)."""
        if self.holdings is None:
            return ""
        names = {n.name for n in self.inventory.nodes} | set(self.full)
        return self.holdings.describe(sorted(names))


# --- memory others hold on each node ---------------------------------------------------------

POD_LABEL_PIPELINE = "llmpipe.io/pipeline"
POD_LABEL_PLAN_HASH = "llmpipe.io/plan-hash"
POD_LABEL_STAGE_INDEX = "llmpipe.io/stage-index"
"""The labels the operator puts on stage pods (manifests.names; a unit test keeps them equal)."""

PipelineKey = tuple[str, str]
"""(namespace, name) of an LLMPipeline."""


@dataclasses.dataclass(frozen=True)
class Reservation:
    """The stages of a plan this operator decided on, whose pods may not exist yet."""

    digest: str
    stages: Mapping[int, tuple[str, int]]
    """stage index -> (node, host memory bytes: the pod's memory request)"""
    gpus: Mapping[int, int] = dataclasses.field(default_factory=dict)
    """stage index -> GPUs it takes (GPU stages only)"""


@dataclasses.dataclass(frozen=True)
class NodeHoldings:
    total: Mapping[str, int]
    """node -> bytes others hold there"""
    holders: Mapping[str, Mapping[str, int]]
    """node -> holder ("pipeline ns/name", "pod ns/name") -> bytes"""
    gpus: Mapping[str, int] = dataclasses.field(default_factory=dict)
    """node -> GPUs (`nvidia.com/gpu`) others hold there"""

    def describe(self, nodes: Sequence[str], *, shown: int = 4) -> str:
        """`pipeline a/x 1.0 GiB on 2 nodes, pod kube-system/y 200 MiB on n1, 3 more`:
        who holds memory on these nodes, largest first."""
        by_holder: dict[str, tuple[int, list[str]]] = {}
        for node in sorted(nodes):
            for who, size in (self.holders.get(node) or {}).items():
                total, where = by_holder.get(who, (0, []))
                by_holder[who] = (total + size, [*where, node])
        ranked = sorted(by_holder.items(), key=lambda item: (-item[1][0], item[0]))
        parts = [
            f"{who} {_mib(size)} on {where[0] if len(where) == 1 else f'{len(where)} nodes'}"
            for who, (size, where) in ranked[:shown]
        ]
        if len(ranked) > shown:
            parts.append(f"{len(ranked) - shown} more")
        return ", ".join(parts)


def held_memory(
    pods: Iterable[Mapping[str, Any]],
    *,
    pipeline: PipelineKey,
    reservations: Mapping[PipelineKey, Reservation],
    beside: str | None = None,
) -> NodeHoldings:
    """Memory requested on each node by everyone but `pipeline`.

    Counted: every pod bound to a node (or pinned to one by a required node affinity and
    not yet bound) that has not terminated, at its effective memory request; and every
    reserved stage of another pipeline whose pod does not exist yet (planned, being
    created). `pipeline`'s own pods are not counted: its plan is made on the memory its
    stages hold now. With `beside` (a plan hash), its own pods of every other plan are
    counted too: they keep running while a switch to that plan brings its stages up.
    """
    total: dict[str, int] = {}
    holders: dict[str, dict[str, int]] = {}
    gpus: dict[str, int] = {}
    existing: set[tuple[str, str, str, str]] = set()

    def add(node: str, who: str, size: int) -> None:
        total[node] = total.get(node, 0) + size
        holders.setdefault(node, {})
        holders[node][who] = holders[node].get(who, 0) + size

    for pod in pods:
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        namespace = str(meta.get("namespace", ""))
        owner = labels.get(POD_LABEL_PIPELINE)
        if owner is not None:
            existing.add(
                (
                    namespace,
                    str(owner),
                    str(labels.get(POD_LABEL_PLAN_HASH, "")),
                    str(labels.get(POD_LABEL_STAGE_INDEX, "")),
                )
            )
        node = pod_node(pod)
        if node is None or _terminated(pod):
            continue
        who = f"pipeline {namespace}/{owner}" if owner else f"pod {namespace}/{meta.get('name')}"
        if (namespace, owner) == pipeline:
            digest = str(labels.get(POD_LABEL_PLAN_HASH, ""))
            if beside is None or digest == beside:
                continue
            who = f"{who} (its running plan {digest})"
        size = pod_memory_request(pod)
        if size > 0:
            add(node, who, size)
        taken = pod_gpu_request(pod)
        if taken > 0:
            gpus[node] = gpus.get(node, 0) + taken
    for key, reservation in sorted(reservations.items()):
        if key == pipeline:
            continue
        for index, (node, size) in sorted(reservation.stages.items()):
            if (*key, reservation.digest, str(index)) not in existing:
                add(node, f"pipeline {key[0]}/{key[1]}", size)
                taken = reservation.gpus.get(index, 0)
                if taken > 0:
                    gpus[node] = gpus.get(node, 0) + taken
    return NodeHoldings(total=total, holders=holders, gpus=gpus)


def own_plans(pods: Iterable[Mapping[str, Any]], *, pipeline: PipelineKey) -> frozenset[str]:
    """The plan hashes of `pipeline`'s pods that still hold memory."""
    found = set()
    for pod in pods:
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        key = (str(meta.get("namespace", "")), labels.get(POD_LABEL_PIPELINE))
        if key == pipeline and not _terminated(pod) and POD_LABEL_PLAN_HASH in labels:
            found.add(str(labels[POD_LABEL_PLAN_HASH]))
    return frozenset(found)


def pod_node(pod: Mapping[str, Any]) -> str | None:
    """The node a pod runs on, or the one node its required node affinity pins it to."""
    spec = pod.get("spec") or {}
    if spec.get("nodeName"):
        return str(spec["nodeName"])
    required = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    ) or {}
    terms = required.get("nodeSelectorTerms") or []
    if len(terms) != 1:
        return None
    for expression in terms[0].get("matchExpressions") or []:
        values = expression.get("values") or []
        if (
            expression.get("key") == "kubernetes.io/hostname"
            and expression.get("operator") == "In"
            and len(values) == 1
        ):
            return str(values[0])
    return None


def pod_memory_request(pod: Mapping[str, Any]) -> int:
    """The scheduler's view: max(sum over containers, largest init container) + overhead."""
    spec = pod.get("spec") or {}

    def request(container: Mapping[str, Any]) -> int:
        value = ((container.get("resources") or {}).get("requests") or {}).get("memory")
        if value is None:
            return 0
        try:
            return inventory.parse_quantity(value)
        except ValueError:
            return 0  # the API server validates quantities; nothing sensible to count

    containers = sum(request(c) for c in spec.get("containers") or [])
    init = max((request(c) for c in spec.get("initContainers") or []), default=0)
    overhead = request({"resources": {"requests": spec.get("overhead") or {}}})
    return max(containers, init) + overhead


def pod_gpu_request(pod: Mapping[str, Any]) -> int:
    """GPUs (`nvidia.com/gpu`) a pod takes: an extended resource is requested through its
    limit (the request, when given, must equal it); the larger of the containers' sum and
    the largest init container, as the scheduler counts it."""
    spec = pod.get("spec") or {}

    def count(container: Mapping[str, Any]) -> int:
        resources = container.get("resources") or {}
        value = (resources.get("limits") or {}).get(devices.RESOURCE_GPU)
        if value is None:
            value = (resources.get("requests") or {}).get(devices.RESOURCE_GPU)
        try:
            return inventory.parse_quantity(value) if value is not None else 0
        except ValueError:
            return 0  # the API server validates quantities

    containers = sum(count(c) for c in spec.get("containers") or [])
    init = max((count(c) for c in spec.get("initContainers") or []), default=0)
    return max(containers, init)


def _terminated(pod: Mapping[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def _mib(size: int) -> str:
    if size >= 2**30:
        return f"{size / 2**30:.1f} GiB"
    return f"{size / 2**20:.0f} MiB"


def build_inventory(
    nodes: Iterable[Mapping[str, Any]],
    *,
    eligibility: Eligibility,
    memory_usage: Mapping[str, int] | None = None,
    gpus_held: Mapping[str, int] | None = None,
    defaults: NodeDefaults = DEFAULTS,
    time_factors: Mapping[str, float] | None = None,
) -> LiveInventory:
    """The eligible nodes as the planner's Inventory; `memory_usage` is bytes in use by
    node, `gpus_held` the GPUs others hold by node, `time_factors` the measured time factor
    of a node whose stages ran slower (> 1) or faster than estimated: its TFLOP/s and
    memory bandwidth (its GPU's too) are divided by it."""
    factors = {k: v for k, v in (time_factors or {}).items() if v > 0 and v != 1.0}
    usage = memory_usage or {}
    held_gpus = gpus_held or {}
    planned: list[inventory.Node] = []
    excluded: dict[str, str] = {}
    full: set[str] = set()
    raw_by_name: dict[str, Mapping[str, Any]] = {}
    for raw in nodes:
        name = str(raw.get("metadata", {}).get("name", ""))
        reason = ineligibility(raw, eligibility)
        node = None
        if reason is None:
            try:
                node = to_node(
                    raw,
                    defaults=defaults,
                    used_bytes=usage.get(name, 0),
                    held_gpus=held_gpus.get(name, 0),
                )
            except NodeFull as error:
                reason = str(error)
                full.add(name)
            except inventory.InventoryError as error:
                reason = str(error)
        if node is None:
            excluded[name] = reason or "not usable"
            continue
        if name in factors:
            node = slowed(node, factors[name])
        planned.append(node)
        raw_by_name[name] = raw
    links, notes = _links(raw_by_name)
    notes += _measured_notes(raw_by_name)
    return LiveInventory(
        inventory=inventory.Inventory(
            nodes=tuple(sorted(planned, key=lambda n: n.name)), links=links
        ),
        excluded=excluded,
        notes=notes,
        full=frozenset(full),
        time_factors={n: f for n, f in factors.items() if n in raw_by_name},
    )


def slowed(node: inventory.Node, factor: float) -> inventory.Node:
    """The node as fast as measured: its compute and bandwidth figures divided by `factor`."""
    gpu = node.gpu
    if gpu is not None:
        gpu = dataclasses.replace(
            gpu,
            tflops=gpu.tflops / factor,
            memory_bandwidth_gbps=gpu.memory_bandwidth_gbps / factor,
        )
    timings = node.timings
    if timings is not None:
        timings = inventory.Timings(
            **{
                field: None if getattr(timings, field) is None else getattr(timings, field) * factor
                for field in inventory.TIMING_FIELDS.values()
            },
            products=tuple((t, r * factor) for t, r in timings.products),
        )
    return dataclasses.replace(
        node,
        tflops=node.tflops / factor,
        memory_bandwidth_gbps=node.memory_bandwidth_gbps / factor,
        gpu=gpu,
        timings=timings,
    )


def ineligibility(node: Mapping[str, Any], eligibility: Eligibility) -> str | None:
    """Why the pipeline may not use this node, or None when it may."""
    meta = node.get("metadata", {})
    name = meta.get("name", "")
    labels = meta.get("labels") or {}
    spec = node.get("spec") or {}
    if name in eligibility.exclude_nodes:
        return "excluded by spec.placement.excludeNodes"
    if not is_ready(node):
        return "not Ready"
    if spec.get("unschedulable"):
        return "cordoned (unschedulable)"
    for key, value in eligibility.node_selector.items():
        if labels.get(key) != value:
            return f"does not match nodeSelector {key}={value}"
    for taint in spec.get("taints") or []:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not eligibility.tolerates(taint):
            return f"taint {_taint_text(taint)} not tolerated"
    return None


def is_ready(node: Mapping[str, Any]) -> bool:
    conditions = (node.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def to_node(
    raw: Mapping[str, Any],
    *,
    defaults: NodeDefaults = DEFAULTS,
    used_bytes: int = 0,
    held_gpus: int = 0,
) -> inventory.Node:
    """One Node object as the planner sees it; InventoryError names the node and field."""
    meta = raw.get("metadata", {})
    name = str(meta.get("name", ""))
    labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
    tier = labels.get(LABEL_TIER, defaults.tier)
    if tier not in inventory.TIERS:
        raise inventory.InventoryError(
            f"node {name!r}: label {LABEL_TIER} must be edge or cloud, got {tier!r}"
        )
    figures, _ = measured.parse((meta.get("annotations") or {}).get(measured.ANNOTATION_MEASURED))
    tflops, bandwidth, gpu = inventory.node_facts(
        labels,
        where=f"node {name!r}",
        tflops=_measured(labels, figures, "tflops"),
        memory_bandwidth_gbps=_measured(labels, figures, "memoryBandwidthGBps"),
        defaults=defaults,
        allocatable_gpus=_allocatable_gpus(raw, name),
        held_gpus=held_gpus,
    )
    return inventory.Node(
        name=name,
        tier=tier,
        memory_bytes=_free_memory(raw, name, used_bytes),
        tflops=tflops,
        memory_bandwidth_gbps=bandwidth,
        uplink_mbps=_label_number(labels, LABEL_UPLINK, name, defaults.uplink_mbps),
        labels=labels,
        gpu=gpu,
        timings=_measured_timings(labels, figures),
    )


def _measured_timings(
    labels: Mapping[str, str], figures: measured.Measured
) -> inventory.Timings | None:
    """The probe's fixed costs (no label stands for them: measurement fills the gap). Its
    product curve is the measured compute, so a person's compute or bandwidth label wins
    over it: then the roofline of the labelled figures applies."""
    timings = figures.timings
    if timings is not None and any(label in labels for label in measured.MEASURED_FIELDS.values()):
        return dataclasses.replace(timings, products=())
    return timings


def _measured(labels: Mapping[str, str], figures: measured.Measured, key: str) -> float | None:
    """The probe's figure where no label gives one (a label a person set wins; it is read
    by `inventory.node_facts`, like a cluster file's labels)."""
    if measured.MEASURED_FIELDS[key] in labels:
        return None
    value = measured.fact(labels, figures, key)
    return None if value is None else float(value)


def _measured_notes(raw_by_name: Mapping[str, Mapping[str, Any]]) -> tuple[str, ...]:
    notes = []
    for name in sorted(raw_by_name):
        annotations = raw_by_name[name].get("metadata", {}).get("annotations") or {}
        _, note = measured.parse(annotations.get(measured.ANNOTATION_MEASURED))
        if note:
            notes.append(f"node {name!r}: {note}")
    return tuple(notes)


def _allocatable_gpus(raw: Mapping[str, Any], name: str) -> int:
    """`status.allocatable["nvidia.com/gpu"]`: 0 when the device plugin does not run there
    (GFD labels alone do not make a GPU schedulable)."""
    value = ((raw.get("status") or {}).get("allocatable") or {}).get(devices.RESOURCE_GPU)
    if value is None:
        return 0
    try:
        return inventory.parse_quantity(value)
    except ValueError as error:
        raise inventory.InventoryError(
            f"node {name!r}: status.allocatable[{devices.RESOURCE_GPU}]: {error}"
        ) from error


def others_use(used: int, own: int = 0) -> int:
    """Memory others hold on a node: what is in use there less this pipeline's own stages
    (they stay in its budget, or a running plan would look as if it no longer fit)."""
    return max(0, used - own)


def usable_memory(allocatable: int, *, used: int | None, own_stage_bytes: int = 0) -> int:
    """Memory a plan may count on: allocatable less what others use (`used` counts every
    pod on the node, the pipeline's own stages too; None: no usage known)."""
    if used is None:
        return allocatable
    return max(0, allocatable - others_use(used, own_stage_bytes))


def _free_memory(raw: Mapping[str, Any], name: str, used_bytes: int) -> int:
    allocatable = ((raw.get("status") or {}).get("allocatable") or {}).get("memory")
    if allocatable is None:
        raise inventory.InventoryError(f"node {name!r}: status.allocatable.memory is missing")
    try:
        total = inventory.parse_quantity(allocatable)
    except ValueError as error:
        raise inventory.InventoryError(
            f"node {name!r}: status.allocatable.memory: {error}"
        ) from error
    free = usable_memory(total, used=used_bytes)
    if free <= 0:
        raise NodeFull(f"no free memory ({_mib(max(used_bytes, 0))} held of {_mib(total)})")
    return free


class NodeFull(inventory.InventoryError):
    """Others hold all of a node's allocatable memory."""


def _label_number(labels: Mapping[str, str], key: str, name: str, default: float) -> float:
    if key not in labels:
        return default
    try:
        value = float(labels[key])
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise inventory.InventoryError(
            f"node {name!r}: label {key} must be a positive number, got {labels[key]!r}"
        )
    return value


def _links(
    raw_by_name: Mapping[str, Mapping[str, Any]],
) -> tuple[tuple[inventory.Link, ...], tuple[str, ...]]:
    """Links between eligible nodes; when both ends annotate a link, the slower one wins."""
    found: dict[frozenset[str], inventory.Link] = {}
    notes: list[str] = []
    for name in sorted(raw_by_name):
        annotations = raw_by_name[name].get("metadata", {}).get("annotations") or {}
        text = annotations.get(ANNOTATION_LINKS)
        if not text:
            continue
        try:
            peers = _parse_links_annotation(name, text)
        except ValueError as error:
            notes.append(str(error))
            continue
        for link in peers:
            if link.b not in raw_by_name:
                continue
            key = frozenset((link.a, link.b))
            earlier = found.get(key)
            if earlier is None or link.mbps < earlier.mbps:
                found[key] = link
    return tuple(found[k] for k in sorted(found, key=sorted)), tuple(notes)


def _parse_links_annotation(name: str, text: str) -> Sequence[inventory.Link]:
    where = f"node {name!r}: annotation {ANNOTATION_LINKS}"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where} is not JSON ({error.msg}); links ignored") from error
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} must map peer node names to {{mbps, rttMs}}; links ignored")
    links = []
    for peer, facts in data.items():
        if peer == name or not isinstance(facts, Mapping):
            raise ValueError(f"{where}: bad entry for {peer!r}; links ignored")
        mbps: Any = facts.get("mbps")
        rtt: Any = facts.get("rttMs", 0)
        if not measured.positive(mbps) or not (measured.positive(rtt) or rtt == 0):
            raise ValueError(f"{where}: {peer!r} needs mbps > 0 and rttMs >= 0; links ignored")
        links.append(inventory.Link(a=name, b=str(peer), mbps=float(mbps), rtt_ms=float(rtt)))
    return links


def _taint_text(taint: Mapping[str, Any]) -> str:
    value = f"={taint['value']}" if taint.get("value") else ""
    return f"{taint.get('key', '')}{value}:{taint.get('effect', '')}"
