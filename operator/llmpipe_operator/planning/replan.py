"""Re-planning decisions: when a node change is worth a new plan, and when to switch.

Purely data-manipulative and computational, like the rest of `planning`: node objects
and plans come in as plain mappings (the Kubernetes Node object, the plan JSON of docs/design.md),
decisions come out as frozen dataclasses and strings. The clock is a parameter, never read
here, so every decision can be replayed in a unit test. No kopf, no API client, no I/O.

The pieces, in the order the reconcile loop uses them:

1. `node_state` reduces a Node object to the facts planning depends on, and
   `classify_change` compares two of them and names what changed (`NodeChange`).
   Heartbeats and other noise classify as nothing.
2. `is_urgent` says whether a change breaks the running plan outright (a planned node
   gone, NotReady or cordoned): those re-plan at once, everything else is debounced.
3. `Debouncer` collects changes into bursts: one re-plan per burst, at most one per window.
4. `plan_problems` checks the running plan against what the nodes offer now, and
   `decide_switch` applies the hysteresis: a feasible running plan is only replaced by a
   plan that improves the objective by at least the configured margin.
5. `describe` writes the cause a user reads in status and Events, e.g.
   "node orin-b NotReady: 4 stages -> 3, bottleneck 18.2 ms -> 24.9 ms".
"""

from __future__ import annotations

import datetime
import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llmpipe_operator.planning import cost, profiles
from llmpipe_operator.planning import inventory as inv

# Only labels and annotations under this prefix feed the planner (`llmpipe.io/tflops`,
# `llmpipe.io/links`, ...); kubelet and controllers rewrite their own all the time, which
# must not cause re-plans (other labels matter only through a pipeline's nodeSelector).
PLANNING_ANNOTATION_PREFIX = "llmpipe.io/"


class ChangeKind(enum.StrEnum):
    """What happened to a node. The value is the `cause` label of the re-plan metric."""

    ADDED = "added"
    REMOVED = "removed"
    NOT_READY = "not-ready"
    READY = "ready"
    CORDONED = "cordoned"
    UNCORDONED = "uncordoned"
    MEMORY = "memory"
    LABELS = "labels"
    ANNOTATIONS = "annotations"
    TAINTS = "taints"
    MEASURED = "measured"
    """The pipeline's stages measured a node slower or faster than estimated, for good."""


# A planned node that is gone, NotReady or cordoned cannot keep (or will lose) its stage:
# waiting out a debounce window would only lengthen the outage.
URGENT_KINDS = frozenset({ChangeKind.REMOVED, ChangeKind.NOT_READY, ChangeKind.CORDONED})

# Ordered by how much they explain: the first kind found wins when one update carries
# several (a node that goes NotReady and gets a taint is reported as NotReady).
_PRECEDENCE = (
    ChangeKind.REMOVED,
    ChangeKind.ADDED,
    ChangeKind.NOT_READY,
    ChangeKind.CORDONED,
    ChangeKind.READY,
    ChangeKind.UNCORDONED,
    ChangeKind.MEMORY,
    ChangeKind.LABELS,
    ChangeKind.ANNOTATIONS,
    ChangeKind.TAINTS,
)


@dataclass(frozen=True)
class NodeState:
    """The facts about a node that planning depends on, and nothing else."""

    name: str
    ready: bool
    unschedulable: bool
    allocatable_memory: str | None
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[tuple[str, str, str], ...] = ()


@dataclass(frozen=True)
class NodeChange:
    """One relevant change of one node; `text` is how a user reads it."""

    node: str
    kind: ChangeKind
    """The most telling of `kinds`: the one `text` describes."""
    text: str
    kinds: frozenset[ChangeKind] = frozenset()
    """Everything that changed in this update (empty: just `kind`)."""
    label_keys: tuple[str, ...] = ()
    """The label keys that changed, when labels did."""

    @property
    def all_kinds(self) -> frozenset[ChangeKind]:
        return self.kinds | {self.kind}


def node_state(node: Mapping[str, Any]) -> NodeState:
    """Reduce a Kubernetes Node object (as a dict) to a `NodeState`."""
    metadata = node.get("metadata") or {}
    spec = node.get("spec") or {}
    status = node.get("status") or {}
    annotations = metadata.get("annotations") or {}
    return NodeState(
        name=str(metadata.get("name", "")),
        ready=_is_ready(status),
        unschedulable=bool(spec.get("unschedulable", False)),
        allocatable_memory=_allocatable_memory(status),
        labels=dict(metadata.get("labels") or {}),
        annotations={
            key: str(value)
            for key, value in annotations.items()
            if key.startswith(PLANNING_ANNOTATION_PREFIX)
        },
        taints=tuple(
            sorted(
                (str(t.get("key", "")), str(t.get("value", "")), str(t.get("effect", "")))
                for t in spec.get("taints") or []
            )
        ),
    )


def _is_ready(status: Mapping[str, Any]) -> bool:
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Ready":
            return bool(condition.get("status") == "True")
    return False


def _allocatable_memory(status: Mapping[str, Any]) -> str | None:
    memory = (status.get("allocatable") or {}).get("memory")
    return None if memory is None else str(memory)


def classify_change(old: NodeState | None, new: NodeState | None) -> NodeChange | None:
    """Name the most telling planning-relevant difference, or None when there is none."""
    if new is None:
        return (
            None
            if old is None
            else NodeChange(old.name, ChangeKind.REMOVED, f"node {old.name} removed")
        )
    if old is None:
        return NodeChange(new.name, ChangeKind.ADDED, f"node {new.name} added")
    found = [(kind, text) for kind in _PRECEDENCE if (text := _difference(kind, old, new))]
    if not found:
        return None
    kind, text = found[0]
    return NodeChange(
        new.name,
        kind,
        f"node {new.name} {text}",
        kinds=frozenset(k for k, _ in found),
        label_keys=tuple(_changed_keys(old.labels, new.labels)),
    )


def _difference(kind: ChangeKind, old: NodeState, new: NodeState) -> str | None:
    if kind is ChangeKind.NOT_READY and old.ready and not new.ready:
        return "NotReady"
    if kind is ChangeKind.READY and not old.ready and new.ready:
        return "Ready"
    if kind is ChangeKind.CORDONED and not old.unschedulable and new.unschedulable:
        return "cordoned"
    if kind is ChangeKind.UNCORDONED and old.unschedulable and not new.unschedulable:
        return "uncordoned"
    if kind is ChangeKind.MEMORY and old.allocatable_memory != new.allocatable_memory:
        return f"allocatable memory {old.allocatable_memory} -> {new.allocatable_memory}"
    if kind is ChangeKind.LABELS and old.labels != new.labels:
        return f"labels changed ({', '.join(_changed_keys(old.labels, new.labels))})"
    if kind is ChangeKind.ANNOTATIONS and old.annotations != new.annotations:
        return f"annotations changed ({', '.join(_changed_keys(old.annotations, new.annotations))})"
    if kind is ChangeKind.TAINTS and old.taints != new.taints:
        return "taints changed"
    return None


def _changed_keys(old: Mapping[str, str], new: Mapping[str, str]) -> list[str]:
    return sorted(key for key in set(old) | set(new) if old.get(key) != new.get(key))


def joined(node: str) -> NodeChange:
    """A node that became usable for the first time since it was added: that reads better
    as "added" than as the Ready transition or label updates that made it so."""
    return NodeChange(node, ChangeKind.ADDED, f"node {node} added")


def is_urgent(change: NodeChange, planned_nodes: Iterable[str]) -> bool:
    """True when the change takes a node of the running plan away: re-plan at once."""
    return change.kind in URGENT_KINDS and change.node in set(planned_nodes)


def is_relevant(
    change: NodeChange,
    *,
    planned_nodes: Iterable[str],
    eligible_before: bool,
    eligible_after: bool,
) -> bool:
    """Whether a pipeline should hear of the change at all: could it change the plan?

    - the node became eligible for the pipeline, or stopped being so: yes;
    - a node the pipeline neither runs on nor may use (other selector, excluded): no;
    - otherwise only changes of what the planner reads: readiness, schedulability, memory,
      `llmpipe.io/*` labels and annotations. Labels that Kubernetes itself maintains
      (`kubernetes.io/arch`, ...) or taints that leave the node eligible change no plan.
    """
    if eligible_before != eligible_after:
        return True
    if not eligible_after and change.node not in set(planned_nodes):
        return False
    if change.all_kinds - {ChangeKind.LABELS, ChangeKind.TAINTS}:
        return True
    return any(key.startswith(PLANNING_ANNOTATION_PREFIX) for key in change.label_keys)


class Debouncer:
    """Groups node changes into bursts: one re-plan per burst, at most one per window.

    A burst opens with the first change after the previous re-plan and closes
    `window_seconds` later; changes that arrive meanwhile join it. So a label that flaps
    every second causes one re-plan per window, not one per flap, and no change waits
    longer than one window. An urgent change closes the burst at once.

    Pure state: callers pass the time (`now`, monotonic seconds) and act on `due`.
    """

    def __init__(self, window_seconds: float) -> None:
        if window_seconds < 0:
            raise ValueError(f"debounce window must be >= 0 seconds, got {window_seconds}")
        self.window_seconds = window_seconds
        self._opened_at: float | None = None
        self._urgent = False
        self._pending: list[NodeChange] = []

    @property
    def pending(self) -> tuple[NodeChange, ...]:
        return tuple(self._pending)

    def add(self, change: NodeChange, *, now: float, urgent: bool = False) -> None:
        """Record a change seen at `now`."""
        if self._opened_at is None:
            self._opened_at = now
        self._urgent = self._urgent or urgent
        self._pending.append(change)

    def make_urgent(self) -> None:
        """Close the pending burst at once (a pending change turned out to be urgent)."""
        if self._opened_at is not None:
            self._urgent = True

    def due_at(self) -> float | None:
        """When the pending burst should be re-planned; None when nothing is pending."""
        if self._opened_at is None:
            return None
        if self._urgent:
            return self._opened_at
        return self._opened_at + self.window_seconds

    def due(self, now: float) -> bool:
        at = self.due_at()
        return at is not None and now >= at

    def take(self) -> tuple[NodeChange, ...]:
        """Hand over the burst's changes (oldest first) and start afresh."""
        changes = tuple(self._pending)
        self._pending.clear()
        self._opened_at = None
        self._urgent = False
        return changes


def objective_seconds(plan: Mapping[str, Any]) -> float:
    """The figure the plan's objective minimises: bottleneck (throughput) or token latency."""
    if plan.get("objective") == "latency":
        return float(plan["tokenLatencySeconds"])
    return float(plan["bottleneckSeconds"])


def reevaluate(
    plan: Mapping[str, Any],
    profile: profiles.ModelProfile,
    inventory: inv.Inventory,
    workload: cost.Workload,
) -> float | None:
    """The running plan's objective on today's facts (its layout re-costed with the cost
    model), or None when a planned node is not in `inventory`. A node measured slower than
    when the plan was made makes the running plan worse too: comparing a candidate with
    the figure recorded at deploy time would never switch away from the slowed node."""
    nodes = [str(s["node"]) for s in plan["stages"]]
    if any(name not in {n.name for n in inventory.nodes} for name in nodes):
        return None
    bounds = [int(s["layerStart"]) for s in plan["stages"]] + [int(plan["stages"][-1]["layerEnd"])]
    try:
        costed = cost.evaluate(profile, inventory, workload, nodes=nodes, bounds=bounds)
    except ValueError:
        return None  # a layout this model cannot have (another profile): not comparable
    return costed.value(workload.objective)


def layout(plan: Mapping[str, Any]) -> tuple[tuple[str, int, int], ...]:
    """(node, layerStart, layerEnd) per stage: two plans with equal layouts run alike."""
    return tuple((str(s["node"]), int(s["layerStart"]), int(s["layerEnd"])) for s in plan["stages"])


def planned_nodes(plan: Mapping[str, Any] | None) -> frozenset[str]:
    if plan is None:
        return frozenset()
    return frozenset(str(stage["node"]) for stage in plan["stages"])


def plan_problems(plan: Mapping[str, Any], available_memory: Mapping[str, int]) -> list[str]:
    """Why the running plan can no longer run as planned; empty when it still can.

    `available_memory` maps each node that can host a stage of this pipeline right now
    (present, Ready, schedulable, admitted by its placement) to the bytes it offers. A
    planned node missing from it is gone for this pipeline; one that offers less than its
    stage needs would not fit the stage again.
    """
    problems = []
    for stage in plan["stages"]:
        node, need = str(stage["node"]), int(stage["memoryBytes"])
        if node not in available_memory:
            problems.append(f"stage {stage['index']}: node {node} is no longer eligible")
        elif available_memory[node] < need:
            problems.append(
                f"stage {stage['index']}: node {node} offers {available_memory[node]} bytes,"
                f" the stage needs {need}"
            )
    return problems


@dataclass(frozen=True)
class SwitchDecision:
    """Whether to move to the candidate plan, and the reason in words."""

    switch: bool
    reason: str
    improvement: float | None = None
    """Relative improvement of the objective, (old - new) / old; None when not compared."""


def decide_switch(
    current: Mapping[str, Any] | None,
    candidate: Mapping[str, Any],
    *,
    problems: Sequence[str] = (),
    margin: float,
    current_objective: float | None = None,
) -> SwitchDecision:
    """Hysteresis: replace a feasible running plan only for a margin's worth of gain.

    `current_objective` is the running plan's objective re-evaluated against today's
    nodes when the caller can; by default the figure recorded in the plan is used.
    """
    if not 0 <= margin < 1:
        raise ValueError(f"improvement margin must be in [0, 1), got {margin}")
    if current is None:
        return SwitchDecision(True, "no plan is running")
    if layout(candidate) == layout(current):
        return SwitchDecision(False, "the new plan places the same layers on the same nodes")
    if problems:
        return SwitchDecision(True, "the running plan is broken: " + "; ".join(problems))
    if current.get("objective") != candidate.get("objective"):
        return SwitchDecision(True, "the objective changed")
    old = objective_seconds(current) if current_objective is None else current_objective
    new = objective_seconds(candidate)
    improvement = (old - new) / old if old > 0 else 0.0
    if improvement >= margin:
        return SwitchDecision(
            True, f"improves the objective by {improvement:.1%} (margin {margin:.0%})", improvement
        )
    return SwitchDecision(
        False,
        f"improves the objective by {improvement:.1%}, below the margin of {margin:.0%}",
        improvement,
    )


def describe(
    changes: Sequence[NodeChange],
    old: Mapping[str, Any] | None,
    new: Mapping[str, Any],
    *,
    max_causes: int = 3,
) -> str:
    """The cause of a re-plan as a user reads it in status and Events.

    >>> describe([NodeChange("orin-b", ChangeKind.NOT_READY, "node orin-b NotReady")],
    ...          {"objective": "throughput", "bottleneckSeconds": 0.0182, "stages": [{}] * 4},
    ...          {"objective": "throughput", "bottleneckSeconds": 0.0249, "stages": [{}] * 3})
    'node orin-b NotReady: 4 stages -> 3, bottleneck 18.2 ms -> 24.9 ms'
    """
    return f"{summarize_changes(changes, max_causes=max_causes)}: {compare_plans(old, new)}"


def summarize_changes(changes: Sequence[NodeChange], *, max_causes: int = 3) -> str:
    """The distinct changes, most telling first, at most `max_causes` of them spelled out."""
    texts = list(dict.fromkeys(c.text for c in sorted(changes, key=_telling_first)))
    if not texts:
        return "re-planned"
    shown = ", ".join(texts[:max_causes])
    hidden = len(texts) - max_causes
    return shown if hidden <= 0 else f"{shown} and {hidden} more"


def _telling_first(change: NodeChange) -> int:
    return _PRECEDENCE.index(change.kind)


def compare_plans(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> str:
    """'4 stages -> 3, bottleneck 18.2 ms -> 24.9 ms' (token latency for that objective)."""
    figure = "token latency" if new.get("objective") == "latency" else "bottleneck"
    if old is None:
        return f"{len(new['stages'])} stages, {figure} {format_seconds(objective_seconds(new))}"
    return (
        f"{len(old['stages'])} stages -> {len(new['stages'])}, {figure} "
        f"{format_seconds(objective_seconds(old))} -> {format_seconds(objective_seconds(new))}"
    )


def primary_kind(changes: Sequence[NodeChange]) -> ChangeKind | None:
    """The most telling kind in a burst: the `cause` label of the re-plan metric."""
    if not changes:
        return None
    return min(changes, key=_telling_first).kind


def format_seconds(seconds: float) -> str:
    """Three significant digits, so that a 10% difference never rounds away."""
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    if seconds >= 1e-6:
        return f"{seconds * 1e6:.0f} µs"
    return f"{seconds * 1e9:.0f} ns"


@dataclass(frozen=True)
class ReplanSettings:
    """How eagerly a pipeline follows the cluster; mirrors the CRD's `spec.replan`."""

    improvement_margin: float = 0.2
    """A feasible running plan is replaced only by one at least this much better (relative):
    every switch restarts stages and reloads weights, so a few percent is not worth it."""

    debounce_seconds: float = 15.0
    """Changes within this window make one re-plan: Wi-Fi and power flaps on edge nodes
    come in bursts, and a re-plan per flap would thrash the pipeline."""

    switch_timeout_seconds: float = 600.0
    """How long the new plan's stages get to become ready before the switch is abandoned
    (the old plan keeps serving, the pipeline is Degraded): loading weights over an edge
    uplink takes minutes."""

    drain_seconds: float = 120.0
    """How long a plan nothing routes to any more keeps running for the sequences it still
    serves, before its objects are deleted: a typical completion (512 tokens at the 5
    tokens/s of a small edge board is ~100 s) finishes on the plan that started it."""

    @classmethod
    def from_spec(cls, replan: Mapping[str, Any] | None) -> ReplanSettings:
        """Parse `spec.replan`; missing fields take the defaults above."""
        replan = replan or {}
        defaults = cls()
        settings = cls(
            improvement_margin=_number(replan, "improvementMargin", defaults.improvement_margin),
            debounce_seconds=_number(replan, "debounceSeconds", defaults.debounce_seconds),
            switch_timeout_seconds=_number(
                replan, "switchTimeoutSeconds", defaults.switch_timeout_seconds
            ),
            drain_seconds=_number(replan, "drainSeconds", defaults.drain_seconds),
        )
        if not 0 <= settings.improvement_margin < 1:
            raise ValueError(
                "spec.replan.improvementMargin must be in [0, 1), e.g. 0.2 for 20%, "
                f"got {settings.improvement_margin}"
            )
        if settings.debounce_seconds < 0:
            raise ValueError(
                f"spec.replan.debounceSeconds must be >= 0, got {settings.debounce_seconds}"
            )
        if settings.drain_seconds < 0:
            raise ValueError(f"spec.replan.drainSeconds must be >= 0, got {settings.drain_seconds}")
        if settings.switch_timeout_seconds <= 0:
            raise ValueError(
                "spec.replan.switchTimeoutSeconds must be > 0, "
                f"got {settings.switch_timeout_seconds}"
            )
        return settings


def _number(data: Mapping[str, Any], key: str, default: float) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"spec.replan.{key} must be a number, got {value!r}")
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"spec.replan.{key} must be a number, got {value!r}") from None


def switch_overdue(
    status: Mapping[str, Any],
    replan_spec: Mapping[str, Any] | None,
    *,
    now: datetime.datetime,
) -> tuple[float, float] | None:
    """(seconds waited, timeout) when a new plan has been rolling out past the switch
    timeout while an old plan serves; None otherwise (no switch, or still in time).

    `status` is the LLMPipeline's status (`planHash`, `servingPlanHash`, `rolloutStarted`),
    `replan_spec` its `spec.replan`.
    """
    target, serving = status.get("planHash"), status.get("servingPlanHash")
    started = _parse_time(status.get("rolloutStarted"))
    if not target or not serving or target == serving or started is None:
        return None
    try:
        timeout = ReplanSettings.from_spec(replan_spec).switch_timeout_seconds
    except ValueError:
        timeout = ReplanSettings().switch_timeout_seconds
    waited = (now - started).total_seconds()
    return (waited, timeout) if waited >= timeout else None


def stalled_switch(
    status: Mapping[str, Any],
    replan_spec: Mapping[str, Any] | None,
    not_ready: Sequence[str],
    *,
    now: datetime.datetime,
) -> str | None:
    """The Degraded message for a switch past its timeout, or None.

    `not_ready` says, per stage of the new plan that is not available, why ("s1:
    Unschedulable: ..."). The old plan keeps serving; the new plan's objects stay, so a
    late stage (an image still pulling) can still complete the switch, and the next
    re-plan replaces them.
    """
    overdue = switch_overdue(status, replan_spec, now=now)
    if overdue is None or not not_ready:
        return None
    # The message stays the same while nothing changes (no seconds counter), so status is
    # not rewritten on every look.
    return (
        f"plan {status.get('planHash')} is not available within "
        f"spec.replan.switchTimeoutSeconds={overdue[1]:g}: {'; '.join(not_ready)}; "
        f"plan {status.get('servingPlanHash')} keeps serving"
    )


def _parse_time(value: Any) -> datetime.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)
