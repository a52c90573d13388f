"""The planner: the best pipeline for a model over a cluster, under cost model v2.

`plan_pipeline(profile, inventory, workload=..., placement=...)` returns a `Plan` whose
`to_dict()` is docs/design.md's plan JSON, or raises `PlanInfeasible` naming what is short.
Exact for up to `SearchSettings.exact_limit` eligible nodes; above that a heuristic
plan that reports a lower bound (`Plan.lower_bound`, `Plan.gap`).

Pure: data in, data out.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal

from llmpipe_operator.planning import chunking, cost, profiles, search
from llmpipe_operator.planning import inventory as inv

Workload = cost.Workload
with_draft = cost.with_draft
SearchSettings = search.SearchSettings
StageRule = Literal["any", "edge"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Placement:
    """Where stages may go."""

    first_stage: StageRule = "any"
    """`edge` keeps raw prompt text and token ids on the edge (stage 0 holds the tokenizer
    side). `any` by default: the planner should not give up speed unasked."""
    last_stage: StageRule = "any"
    """`edge` keeps the sampled tokens on the edge too."""
    max_stages: int | None = None
    """Cap on the stage count (None: as many as there are eligible nodes)."""

    def __post_init__(self) -> None:
        for field in ("first_stage", "last_stage"):
            if getattr(self, field) not in ("any", "edge"):
                raise ValueError(f"{field} must be any or edge, got {getattr(self, field)!r}")
        if self.max_stages is not None and self.max_stages < 1:
            raise ValueError(f"max_stages must be >= 1, got {self.max_stages}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stage:
    """One stage of a plan. Times are at the objective's batch: S for throughput, 1 for
    latency; `transfer_seconds` is the send to the next stage (the last: back to 0)."""

    index: int
    node: str
    layer_start: int
    layer_end: int
    has_embedding: bool
    has_head: bool
    memory_bytes: int
    """memory_s, in the memory of the stage's device (a discrete GPU's, else the node's)."""
    compute_seconds: float
    transfer_seconds: float
    device: cost.StageDevice = "cpu"
    """Where the stage computes: `cuda` on a node GPU, else `cpu`."""
    dtype: str = "bfloat16"
    """The dtype the stage loads its weights in (`spec.model.dtype`, or the device's)."""
    host_memory_bytes: int | None = None
    """Node memory the stage's pod requests; None: memory_bytes (CPU and unified memory)."""
    draft_memory_bytes: int = 0
    """Stage 0: the part of memory_bytes its draft model takes (weights + KV cache, D of
    docs/planning.md); 0 without one, and then not in the plan JSON."""

    @property
    def gpus(self) -> int:
        return cost.GPUS_PER_STAGE if self.device == "cuda" else 0

    @property
    def host_bytes(self) -> int:
        return self.memory_bytes if self.host_memory_bytes is None else self.host_memory_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "node": self.node,
            "layerStart": self.layer_start,
            "layerEnd": self.layer_end,
            "hasEmbedding": self.has_embedding,
            "hasHead": self.has_head,
            "memoryBytes": self.memory_bytes,
            "computeSeconds": self.compute_seconds,
            "transferSeconds": self.transfer_seconds,
            "device": self.device,
            "dtype": self.dtype,
            "gpus": self.gpus,
            "hostMemoryBytes": self.host_bytes,
            # only with a draft model: the plans (and hashes) of other pipelines stay as were
            **({"draftMemoryBytes": self.draft_memory_bytes} if self.draft_memory_bytes else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Stage:
        """Plans written before devices existed have no device fields: CPU stages."""
        device = data.get("device", "cpu")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"plan: unknown stage device {device!r}")
        return cls(
            index=int(data["index"]),
            node=str(data["node"]),
            layer_start=int(data["layerStart"]),
            layer_end=int(data["layerEnd"]),
            has_embedding=bool(data["hasEmbedding"]),
            has_head=bool(data["hasHead"]),
            memory_bytes=int(data["memoryBytes"]),
            compute_seconds=float(data["computeSeconds"]),
            transfer_seconds=float(data["transferSeconds"]),
            device=device,
            dtype=str(data.get("dtype", "bfloat16")),
            host_memory_bytes=(int(data["hostMemoryBytes"]) if "hostMemoryBytes" in data else None),
            draft_memory_bytes=int(data.get("draftMemoryBytes", 0)),
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """A pipeline: ordered stages and what cost model v2 expects of them."""

    objective: cost.Objective
    bottleneck_seconds: float
    token_latency_seconds: float
    est_tokens_per_second: float
    stages: tuple[Stage, ...]
    time_to_first_token_seconds: float = 0.0
    """Cost model v2's estimate for a prompt of the workload's prompt tokens (0: unknown,
    a plan written before v2)."""
    exact: bool = True
    """True when the search covered every ordered subset and split (the optimum)."""
    lower_bound: float | None = None
    """No plan has an objective below this; equals the objective when exact. Not part
    of the plan JSON (docs/design.md fixes its fields)."""
    prefill_chunk_tokens: int = 0
    """The pipelined prefill chunk the cost model chose (`chunking.choose`); 0: none."""
    chunked_time_to_first_token_seconds: float = 0.0
    """The estimated time to first token with that chunk (0: unknown, an older plan)."""
    unchunked_time_to_first_token_seconds: float = dataclasses.field(default=0.0, compare=False)
    """The same formula with the prompt in one step, to compare (0: unknown). Not part of
    the plan JSON (the plan's equality ignores it)."""

    @property
    def objective_value(self) -> float:
        if self.objective == "throughput":
            return self.bottleneck_seconds
        return self.token_latency_seconds

    @property
    def gap(self) -> float | None:
        """objective / lower bound (1.0 = provably optimal)."""
        if self.lower_bound is None or self.lower_bound <= 0:
            return None
        return self.objective_value / self.lower_bound

    @property
    def bottleneck_stage(self) -> int:
        """The stage whose max(compute, transfer) is largest."""
        return max(self.stages, key=lambda s: max(s.compute_seconds, s.transfer_seconds)).index

    def to_dict(self) -> dict[str, Any]:
        """Exactly docs/design.md's plan JSON."""
        return {
            "objective": self.objective,
            "bottleneckSeconds": self.bottleneck_seconds,
            "tokenLatencySeconds": self.token_latency_seconds,
            "estTokensPerSecond": self.est_tokens_per_second,
            "estTimeToFirstTokenSeconds": self.time_to_first_token_seconds,
            "prefillChunkTokens": self.prefill_chunk_tokens,
            "estChunkedTimeToFirstTokenSeconds": self.chunked_time_to_first_token_seconds,
            "stages": [stage.to_dict() for stage in self.stages],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """Parse docs/design.md's plan JSON (as read back from a ConfigMap)."""
        objective = data["objective"]
        if objective not in cost.OBJECTIVES:
            raise ValueError(f"plan: unknown objective {objective!r}")
        return cls(
            objective=objective,
            bottleneck_seconds=float(data["bottleneckSeconds"]),
            token_latency_seconds=float(data["tokenLatencySeconds"]),
            est_tokens_per_second=float(data["estTokensPerSecond"]),
            stages=tuple(Stage.from_dict(s) for s in data["stages"]),
            time_to_first_token_seconds=float(data.get("estTimeToFirstTokenSeconds", 0.0)),
            prefill_chunk_tokens=int(data.get("prefillChunkTokens", 0)),
            chunked_time_to_first_token_seconds=float(
                data.get("estChunkedTimeToFirstTokenSeconds", 0.0)
            ),
            exact=True,
            lower_bound=None,
        )


class PlanInfeasible(Exception):
    """No pipeline fits. str() says what is short; the fields let a status report it."""

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        needed_bytes: int,
        available_bytes: int,
        weight_bytes: int,
        kv_cache_bytes: int,
        eligible_nodes: int,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        """A short code: no-nodes, no-gpu, total-memory, largest-layer, first-stage,
        last-stage, max-stages or fragmented."""
        self.needed_bytes = needed_bytes
        """Weights + KV cache of the whole model, and stage 0's draft model if any
        (runtime overhead not included)."""
        self.available_bytes = available_bytes
        """What the eligible nodes offer for weights + KV (memory minus overhead)."""
        self.weight_bytes = weight_bytes
        self.kv_cache_bytes = kv_cache_bytes
        self.eligible_nodes = eligible_nodes


def plan_pipeline(
    profile: profiles.ModelProfile,
    inventory: inv.Inventory,
    *,
    workload: cost.Workload,
    placement: Placement | None = None,
    settings: search.SearchSettings | None = None,
) -> Plan:
    """The best pipeline for `profile` over `inventory`; raises PlanInfeasible."""
    placement = placement or Placement()
    settings = settings or search.SearchSettings()
    # 1. keep the nodes that can hold at least one stage
    nodes = eligible_nodes(profile, inventory, workload)
    problem = _problem(profile, inventory, workload, placement, nodes)
    # 2. search: exactly when small enough, else heuristically
    exact = len(nodes) <= settings.exact_limit
    chain = None
    if nodes:
        chain = (
            exact_chain(profile, inventory, workload, placement, nodes)
            if exact
            else _heuristic_chain(profile, inventory, workload, placement, nodes, settings)
        )
    if chain is None:
        raise diagnose(profile, inventory, workload=workload, placement=placement)
    # 3. cost the chosen chain once more, with the one cost model
    costed = problem.evaluate(chain)
    bound = (
        costed.value(workload.objective)
        if exact
        else round_lower_bound(profile, inventory, workload, placement, nodes)
    )
    chunk = chunking.choose(profile, inventory, workload, costed)
    return dataclasses.replace(
        _plan(costed, workload, exact=exact, lower_bound=bound),
        prefill_chunk_tokens=chunk.chunk_tokens,
        chunked_time_to_first_token_seconds=chunk.time_to_first_token_seconds,
        unchunked_time_to_first_token_seconds=chunk.whole_prompt_seconds,
    )


def exact_chain(
    profile: profiles.ModelProfile,
    inventory: inv.Inventory,
    workload: cost.Workload,
    placement: Placement,
    nodes: list[inv.Node],
) -> search.Chain | None:
    """The optimal chain. For throughput a round costs K micro-batches of S / K tokens,
    K the chain's stage count, so the search runs once per K over chains of at most K
    stages: a chain of k < K stages costs no less at K than at its own k (cost model v2),
    so the least of the K searches' winners, costed at their own stage counts, is the
    optimum (docs/planning.md, "How the plan is searched")."""
    if workload.objective == "latency":  # batch 1: no round, no K
        return search.exact(_problem(profile, inventory, workload, placement, nodes))
    found: list[search.Chain] = []
    best = math.inf
    for k in _stage_counts(profile, placement, nodes):
        # no chain of k or more stages beats the bound at K = k (its cost only grows with
        # K): past the best found, the larger K cannot win (ties still searched)
        longer = _problem(profile, inventory, workload, placement, nodes, micro_batches=k)
        if search.lower_bound(longer) > best:
            break
        problem = _problem(
            profile, inventory, workload, placement, nodes, micro_batches=k, stages=k
        )
        chain = search.exact(problem)
        if chain is not None:
            found.append(chain)
            best = min(best, _score(profile, inventory, workload, nodes, chain)[0])
    return _best(profile, inventory, workload, nodes, found)


def round_lower_bound(
    profile: profiles.ModelProfile,
    inventory: inv.Inventory,
    workload: cost.Workload,
    placement: Placement,
    nodes: list[inv.Node],
) -> float:
    """No chain's objective is below this. Throughput: chains of k in [K, 2K) stages cost
    at least the bound of rounds of K micro-batches, for K = 1, 2, 4, ...; the least of
    those bounds."""
    if workload.objective == "latency":
        return search.lower_bound(_problem(profile, inventory, workload, placement, nodes))
    counts = _stage_counts(profile, placement, nodes)
    bounds, k = [], 1
    while k <= counts.stop - 1:
        problem = _problem(
            profile, inventory, workload, placement, nodes, micro_batches=k, stages=2 * k - 1
        )
        bounds.append(search.lower_bound(problem))
        k *= 2
    return min(bounds)


def _heuristic_chain(
    profile: profiles.ModelProfile,
    inventory: inv.Inventory,
    workload: cost.Workload,
    placement: Placement,
    nodes: list[inv.Node],
    settings: search.SearchSettings,
) -> search.Chain | None:
    """The heuristic at K = 1, then once more at the stage count of what it found; the
    better of the two chains."""
    if workload.objective == "latency":
        problem = _problem(profile, inventory, workload, placement, nodes)
        return search.heuristic(problem, settings)
    found: list[search.Chain] = []
    count, tried = 1, set[int]()
    while count not in tried and len(tried) < 2:
        tried.add(count)
        problem = _problem(profile, inventory, workload, placement, nodes, micro_batches=count)
        chain = search.heuristic(problem, settings)
        if chain is None:
            break
        found.append(chain)
        count = len(chain.nodes)
    return _best(profile, inventory, workload, nodes, found)


def _stage_counts(
    profile: profiles.ModelProfile, placement: Placement, nodes: list[inv.Node]
) -> range:
    cap = placement.max_stages if placement.max_stages is not None else len(nodes)
    return range(1, max(1, min(cap, len(nodes), profile.num_layers)) + 1)


def _best(
    profile: profiles.ModelProfile,
    inventory: inv.Inventory,
    workload: cost.Workload,
    nodes: list[inv.Node],
    chains: list[search.Chain],
) -> search.Chain | None:
    """The chain with the best (objective, other objective), each costed at its own
    stage count; the first of equals."""
    if not chains:
        return None

    return min(chains, key=lambda chain: _score(profile, inventory, workload, nodes, chain))


def _score(
    profile: profiles.ModelProfile,
    inventory: inv.Inventory,
    workload: cost.Workload,
    nodes: list[inv.Node],
    chain: search.Chain,
) -> tuple[float, float]:
    """(objective, other objective) of the chain at its own stage count."""
    names = [nodes[i].name for i in chain.nodes]
    costed = cost.evaluate(profile, inventory, workload, nodes=names, bounds=chain.bounds)
    pair = (costed.bottleneck_seconds, costed.token_latency_seconds)
    return pair if workload.objective == "throughput" else (pair[1], pair[0])


def eligible_nodes(
    profile: profiles.ModelProfile, inventory: inv.Inventory, workload: cost.Workload
) -> list[inv.Node]:
    """Nodes with room for the smallest possible stage (one layer, its KV cache, R)."""
    smallest = min(
        cost.memory_bytes(profile, workload, i, i + 1) - _ends(profile, workload, i)
        for i in range(profile.num_layers)
    )
    return [node for node in inventory.nodes if cost.stage_budget(node, workload) >= smallest]


def _ends(profile: profiles.ModelProfile, workload: cost.Workload, layer: int) -> int:
    """Embedding/head (and draft model) bytes that memory_bytes adds for a one-layer stage
    at the ends."""
    extra = profile.embed_bytes + workload.first_stage_bytes if layer == 0 else 0
    return extra + (profile.head_bytes if layer == profile.num_layers - 1 else 0)


def _problem(
    profile: profiles.ModelProfile,
    inventory: inv.Inventory,
    workload: cost.Workload,
    placement: Placement,
    nodes: list[inv.Node],
    *,
    micro_batches: int = 1,
    stages: int | None = None,
) -> search.Problem:
    """The search instance: chains of at most `stages` (and the placement's cap) stages,
    rounds costed at `micro_batches` micro-batches (K; 1: the lower bound's relaxation)."""
    cap = placement.max_stages if placement.max_stages is not None else len(nodes)
    if stages is not None:
        cap = min(cap, stages)
    return search.Problem(
        profile,
        inventory,
        workload,
        nodes=nodes,
        first_edge=placement.first_stage == "edge",
        last_edge=placement.last_stage == "edge",
        max_stages=max(1, min(cap, len(nodes))),
        micro_batches=micro_batches,
    )


def _plan(
    costed: cost.ChainCost, workload: cost.Workload, *, exact: bool, lower_bound: float
) -> Plan:
    throughput = workload.objective == "throughput"
    stages = tuple(
        Stage(
            index=s,
            node=st.node,
            layer_start=st.layer_start,
            layer_end=st.layer_end,
            has_embedding=st.has_embedding,
            has_head=st.has_head,
            memory_bytes=st.memory_bytes,
            compute_seconds=st.compute_batch if throughput else st.compute_single,
            transfer_seconds=st.transfer_batch if throughput else st.transfer_single,
            device=st.device,
            dtype=st.dtype,
            host_memory_bytes=st.host_memory_bytes,
            draft_memory_bytes=workload.first_stage_bytes if s == 0 else 0,
        )
        for s, st in enumerate(costed.stages)
    )
    return Plan(
        objective=workload.objective,
        bottleneck_seconds=costed.bottleneck_seconds,
        token_latency_seconds=costed.token_latency_seconds,
        est_tokens_per_second=workload.max_sequences / costed.bottleneck_seconds,
        stages=stages,
        time_to_first_token_seconds=costed.time_to_first_token_seconds,
        exact=exact,
        lower_bound=lower_bound,
    )


# why nothing fits ---------------------------------------------------------------------


def diagnose(
    profile: profiles.ModelProfile,
    inventory: inv.Inventory,
    *,
    workload: cost.Workload,
    placement: Placement,
) -> PlanInfeasible:
    """The most specific reason no chain fits, with the numbers a user can act on."""
    weights = profile.total_weight_bytes
    kv = workload.kv_tokens * profile.kv_bytes_per_token_per_layer * profile.num_layers
    draft = workload.first_stage_bytes
    nodes = eligible_nodes(profile, inventory, workload)
    overhead = workload.runtime_overhead_bytes
    rooms = sorted((cost.stage_budget(n, workload) - overhead for n in nodes), reverse=True)
    available = sum(rooms)
    needs = f"needs {cost.human_bytes(weights)} of weights + {cost.human_bytes(kv)} of KV cache"
    if draft:
        needs += f" + {cost.human_bytes(draft)} for stage 0's draft model (weights + KV cache)"
    offer = (
        f"the {len(nodes)} eligible node{'s' * (len(nodes) != 1)} offer "
        f"{cost.human_bytes(available)} in total after "
        f"{cost.human_bytes(overhead)} runtime overhead each"
    )
    count = len(inventory.nodes)
    gpu_less = not any(cost.usable(n, workload) for n in inventory.nodes)
    if not nodes and inventory.nodes and gpu_less:
        offer = f"{count} matching node{'s' * (count != 1)}, none with a free GPU"
    elif not nodes and inventory.nodes:  # nodes match the placement, but none has room
        offer = (
            f"none of the {count} matching node{'s' * (count != 1)} has room for the "
            f"smallest stage (largest free: "
            f"{cost.human_bytes(max(cost.stage_budget(n, workload) for n in inventory.nodes))})"
        )
    facts = {
        "needed_bytes": weights + kv + draft,
        "available_bytes": available,
        "weight_bytes": weights,
        "kv_cache_bytes": kv,
        "eligible_nodes": len(nodes),
    }
    reason, detail = _shortfall(profile, inventory, workload, placement, nodes, rooms)
    message = f"{needs}; {offer}" + (f"; {detail}" if detail else "")
    return PlanInfeasible(message, reason=reason, **facts)


def _shortfall(
    profile: profiles.ModelProfile,
    inventory: inv.Inventory,
    workload: cost.Workload,
    placement: Placement,
    nodes: list[inv.Node],
    rooms: list[int],
) -> tuple[str, str]:
    """(reason code, the sentence that says what is short)."""
    kv_layer = workload.kv_tokens * profile.kv_bytes_per_token_per_layer
    largest = max(profile.layer_bytes)
    if not inventory.nodes:
        return "no-nodes", "the cluster has no nodes"
    if not any(cost.usable(n, workload) for n in inventory.nodes):
        return "no-gpu", (
            "spec.runtime.device is cuda: a stage needs a node whose GPU Feature Discovery "
            "labels (nvidia.com/gpu.*) and allocatable nvidia.com/gpu show a GPU no other "
            "pod holds"
        )
    if not nodes or largest + kv_layer > max(rooms):
        biggest = max(cost.stage_budget(n, workload) for n in inventory.nodes)
        return "largest-layer", (
            f"the largest single layer ({cost.human_bytes(largest)} + "
            f"{cost.human_bytes(kv_layer)} KV cache + "
            f"{cost.human_bytes(workload.runtime_overhead_bytes)} overhead) fits nowhere "
            f"(largest node: {cost.human_bytes(biggest)})"
        )
    need = profile.total_weight_bytes + kv_layer * profile.num_layers + workload.first_stage_bytes
    overhead = workload.runtime_overhead_bytes
    rooms_by_node = [cost.stage_budget(n, workload) - overhead for n in nodes]
    if sum(rooms) < need:
        return "total-memory", f"short by {cost.human_bytes(need - sum(rooms))}"
    draft = _draft_shortfall(profile, workload, placement, nodes, rooms_by_node, kv_layer)
    if draft is not None:
        return draft
    for rule, end, layer, part in (
        (placement.first_stage, "first", 0, profile.embed_bytes + workload.first_stage_bytes),
        (placement.last_stage, "last", profile.num_layers - 1, profile.head_bytes),
    ):
        edge_rooms = [r for r, n in zip(rooms_by_node, nodes, strict=True) if n.tier == "edge"]
        smallest_end = part + profile.layer_bytes[layer] + kv_layer
        if rule == "edge" and not edge_rooms:
            return f"{end}-stage", (
                f"the {end} stage must run on an edge node, and no eligible node is an edge node"
            )
        if rule == "edge" and max(edge_rooms) < smallest_end:
            what = "embeddings" if end == "first" else "head"
            return f"{end}-stage", (
                f"the {end} stage must run on an edge node, and no edge node has room for "
                f"the {what} ({cost.human_bytes(part)}) + one layer "
                f"({cost.human_bytes(profile.layer_bytes[layer] + kv_layer)} with KV cache)"
            )
    if placement.max_stages is not None and sum(rooms[: placement.max_stages]) < need:
        top = sum(rooms[: placement.max_stages])
        return "max-stages", (
            f"with at most {placement.max_stages} stages the largest nodes offer "
            f"{cost.human_bytes(top)}, short by {cost.human_bytes(need - top)}"
        )
    return "fragmented", (
        "the memory adds up, but no chain of nodes was found that fits every stage "
        "(whole layers do not pack into the free memory of the nodes)"
    )


def _draft_shortfall(
    profile: profiles.ModelProfile,
    workload: cost.Workload,
    placement: Placement,
    nodes: list[inv.Node],
    rooms: list[int],
    kv_layer: int,
) -> tuple[str, str] | None:
    """Stage 0 holds the draft model beside the embeddings and at least one layer: the
    sentence when no node it may run on has room for that (None: some node has)."""
    draft = workload.first_stage_bytes
    if not draft:
        return None
    smallest = profile.embed_bytes + profile.layer_bytes[0] + kv_layer + draft
    allowed = [
        room
        for room, node in zip(rooms, nodes, strict=True)
        if placement.first_stage != "edge" or node.tier == "edge"
    ]
    if not allowed or max(allowed) >= smallest:
        return None
    where = "edge node" if placement.first_stage == "edge" else "node"
    return "first-stage", (
        f"stage 0 holds the draft model ({cost.human_bytes(draft)}: weights + KV cache) "
        f"beside the embeddings and one layer ({cost.human_bytes(smallest - draft)} with KV "
        f"cache), {cost.human_bytes(smallest)} in all, and no {where} has that room after "
        f"the runtime overhead (largest: {cost.human_bytes(max(allowed))}); try a smaller "
        "spec.model.draft, fewer maxSequences or a shorter maxContextTokens"
    )
