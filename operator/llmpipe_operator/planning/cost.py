"""Cost model v2 of docs/design.md: memory, compute (weights and the KV cache read at the
average context), transfer and hop time of each stage, and a chain's time to first token,
with per-node device facts (a GPU stage's memory budget, compute and bandwidth are its
GPU's: `stage_budget`, `speeds`).

This module is the one definition of the cost model: the planner's search, the plan it
reports, the benchmark's baselines and the tests' brute force all evaluate chains here.

Pure: numbers in, numbers out.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Literal

from llmpipe_operator.planning import devices, profiles
from llmpipe_operator.planning import inventory as inv

Objective = Literal["throughput", "latency"]
OBJECTIVES: tuple[Objective, ...] = ("throughput", "latency")
StageDevice = Literal["cpu", "cuda"]
GPUS_PER_STAGE = 1
"""A stage runs its layers on one GPU (the runtime has no tensor parallelism)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Workload:
    """What the pipeline must serve; fixes the KV cache size and the batch per step."""

    objective: Objective = "throughput"
    """Throughput: many users at once is the reason to pipeline over several nodes."""
    max_sequences: int = 4
    """S, sequences in flight. Four keeps a 4-stage ring busy while the KV cache of a 7B
    model at 2k context still fits on 16 GiB edge boxes."""
    max_context_tokens: int = 2048
    """C, prompt + generated tokens per sequence: enough for chat, small enough for edge."""
    runtime_overhead_bytes: int = 512 * 2**20
    """R, per stage: Python, torch and gRPC buffers take about 0.5 GiB besides weights."""
    device: devices.Device = "auto"
    """`spec.runtime.device`: auto uses a node's GPU when it has one free, cpu never does,
    cuda plans on GPU nodes only."""
    dtype: str = devices.DTYPE_AUTO
    """`spec.model.dtype`; `auto` picks per stage (`stage_dtype`). The byte sizes come
    from the profile either way: every dtype `auto` picks is 2 bytes wide."""
    average_context_tokens: int | None = None
    """Ĉ, the context a decode step attends to on average, whose KV cache it reads. None:
    C / 2 (a sequence's context grows from its prompt to at most C)."""
    prompt_tokens: int | None = None
    """P, the prompt the time-to-first-token estimate is for. None: C / 4 (a chat turn
    with some history)."""

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be throughput or latency, got {self.objective!r}")
        for field in ("max_sequences", "max_context_tokens"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if self.runtime_overhead_bytes < 0:
            overhead = self.runtime_overhead_bytes
            raise ValueError(f"runtime_overhead_bytes must be >= 0, got {overhead}")
        if self.device not in devices.DEVICES:
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        for field in ("average_context_tokens", "prompt_tokens"):
            value = getattr(self, field)
            if value is not None and not 1 <= value <= self.max_context_tokens:
                raise ValueError(
                    f"{field} must be in [1, max_context_tokens={self.max_context_tokens}], "
                    f"got {value}"
                )

    @property
    def average_context(self) -> int:
        """Ĉ: `average_context_tokens`, else C / 2 (at least 1)."""
        return self.average_context_tokens or max(1, self.max_context_tokens // 2)

    @property
    def prompt(self) -> int:
        """P: `prompt_tokens`, else C / 4 (at least 1)."""
        return self.prompt_tokens or max(1, self.max_context_tokens // 4)

    @property
    def kv_tokens(self) -> int:
        """Tokens whose KV cache each layer keeps: S * C."""
        return self.max_sequences * self.max_context_tokens


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageCost:
    """One stage of a chain, costed at batch S (throughput) and batch 1 (latency)."""

    node: str
    layer_start: int
    layer_end: int
    has_embedding: bool
    has_head: bool
    weight_bytes: int
    memory_bytes: int
    """memory_s: weights + KV cache + R, in the memory of the stage's device."""
    host_memory_bytes: int
    """What the stage's pod requests of the node's memory: memory_s, or only R for a stage
    on a discrete GPU (its weights and KV cache live in GPU memory)."""
    device: StageDevice
    dtype: str
    fits: bool
    compute_batch: float
    """compute_s(S)"""
    compute_single: float
    """compute_s(1)"""
    transfer_batch: float
    """xfer_s(S), to the next stage (the last stage: token ids back to stage 0)."""
    transfer_single: float
    hop: float
    prefill: float = 0.0
    """prefill_s(P): the stage's share of a P-token prompt's first pass."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChainCost:
    stages: tuple[StageCost, ...]
    bottleneck_seconds: float
    """T = max over stages of max(compute_s(S), xfer_s(S))"""
    token_latency_seconds: float
    """Λ = sum over stages of compute_s(1) + xfer_s(1) + hop_s"""
    time_to_first_token_seconds: float = 0.0
    """TTFT = sum over stages of prefill_s(P) + the P hidden states' hops + the first
    token's way back to stage 0"""

    @property
    def fits(self) -> bool:
        return all(stage.fits for stage in self.stages)

    def value(self, objective: Objective) -> float:
        if objective == "throughput":
            return self.bottleneck_seconds
        return self.token_latency_seconds


def weight_bytes(profile: profiles.ModelProfile, start: int, end: int) -> int:
    """weights_s of a stage holding layers [start, end)."""
    total = sum(profile.layer_bytes[start:end])
    if start == 0:
        total += profile.embed_bytes
    if end == profile.num_layers:
        total += profile.head_bytes
    return total


def memory_bytes(profile: profiles.ModelProfile, workload: Workload, start: int, end: int) -> int:
    """memory_s = weights_s + S * C * kvBytesPerTokenPerLayer * (end - start) + R."""
    kv = workload.kv_tokens * profile.kv_bytes_per_token_per_layer * (end - start)
    return weight_bytes(profile, start, end) + kv + workload.runtime_overhead_bytes


# per-node device facts ----------------------------------------------------------------


def stage_device(node: inv.Node, workload: Workload) -> StageDevice:
    """cuda when the node has a free GPU and the spec does not say cpu."""
    return "cuda" if node.gpu is not None and workload.device != "cpu" else "cpu"


def usable(node: inv.Node, workload: Workload) -> bool:
    """False for a node without a GPU when the spec says cuda."""
    return workload.device != "cuda" or node.gpu is not None


def stage_budget(node: inv.Node, workload: Workload) -> int:
    """The memory a stage on this node may fill with weights + KV cache + R.

    A discrete GPU offers its own memory (GPUS_PER_STAGE of them), as long as the node's
    memory still holds the process (R); a unified-memory board (Jetson) and a CPU node
    offer the node's memory: one budget, not two.
    """
    if not usable(node, workload):
        return 0
    gpu = node.gpu
    if stage_device(node, workload) == "cpu" or gpu is None or gpu.unified:
        return node.memory_bytes
    if node.memory_bytes < workload.runtime_overhead_bytes:
        return 0
    return gpu.memory_bytes * min(GPUS_PER_STAGE, gpu.count)


def host_memory(node: inv.Node, workload: Workload, memory: int) -> int:
    """The node memory a stage holding `memory` (memory_s) takes: R on a discrete GPU."""
    gpu = node.gpu
    if stage_device(node, workload) == "cuda" and gpu is not None and not gpu.unified:
        return workload.runtime_overhead_bytes
    return memory


def speeds(node: inv.Node, workload: Workload) -> tuple[float, float]:
    """(TFLOP/s, memory GB/s) of the device a stage on this node computes on."""
    if stage_device(node, workload) == "cuda" and node.gpu is not None:
        return node.gpu.tflops, node.gpu.memory_bandwidth_gbps
    return node.tflops, node.memory_bandwidth_gbps


def stage_dtype(node: inv.Node, workload: Workload) -> str:
    """The dtype the stage runs in: the spec's, or under auto the device's best."""
    if workload.dtype != devices.DTYPE_AUTO:
        return workload.dtype
    if stage_device(node, workload) == "cuda" and node.gpu is not None:
        return devices.gpu_dtype(node.gpu)
    return devices.CPU_AUTO_DTYPE


def compute_seconds(
    profile: profiles.ModelProfile,
    node: inv.Node,
    weights: int,
    *,
    batch: int,
    workload: Workload,
    layers: int = 0,
) -> float:
    """One decode step of `batch` tokens on the stage's device (`speeds`): the larger of
    reading the weights once and doing 2 FLOPs per parameter per token, plus reading each
    sequence's KV cache at the average context in each of the stage's `layers` (v2)."""
    tflops, bandwidth = speeds(node, workload)
    memory_bound = weights / (bandwidth * 1e9)
    params = weights / profile.weight_bytes_per_param
    flop_bound = 2 * params * batch / (tflops * 1e12)
    return max(memory_bound, flop_bound) + kv_read_seconds(
        profile, node, workload, batch=batch, layers=layers
    )


def kv_read_seconds(
    profile: profiles.ModelProfile, node: inv.Node, workload: Workload, *, batch: int, layers: int
) -> float:
    """kv_s(batch) = batch * Ĉ * kvBytesPerTokenPerLayer * layers / bandwidth."""
    _, bandwidth = speeds(node, workload)
    kv_bytes = batch * workload.average_context * profile.kv_bytes_per_token_per_layer * layers
    return kv_bytes / (bandwidth * 1e9)


def prefill_seconds(
    profile: profiles.ModelProfile, node: inv.Node, weights: int, *, workload: Workload
) -> float:
    """prefill_s(P): a P-token prompt in one pass, the larger of reading the weights once
    and 2 FLOPs per parameter per token (attention over the prompt itself is not counted:
    beside the weights' FLOPs it is small while P is well below 6 x the hidden size)."""
    return compute_seconds(profile, node, weights, batch=workload.prompt, workload=workload)


def activation_seconds(profile: profiles.ModelProfile, mbps: float, *, batch: int) -> float:
    """xfer_s for s < last: the hidden state of `batch` tokens to the next stage."""
    return 8 * batch * profile.hidden_size * profile.activation_bytes / (mbps * 1e6)


def token_ids_seconds(mbps: float, *, batch: int) -> float:
    """xfer_last: `batch` int32 token ids from the last stage back to stage 0."""
    return 8 * batch * profiles.TOKEN_ID_BYTES / (mbps * 1e6)


def hop_seconds(rtt_ms: float) -> float:
    return rtt_ms / 2 / 1000


def evaluate(
    profile: profiles.ModelProfile,
    inventory: inv.Inventory,
    workload: Workload,
    *,
    nodes: Sequence[str],
    bounds: Sequence[int],
) -> ChainCost:
    """Cost a chain: stage s runs on nodes[s] and holds layers [bounds[s], bounds[s+1]).

    `bounds` has len(nodes) + 1 entries from 0 to numLayers, strictly increasing.
    """
    _check_chain(profile, nodes, bounds)
    count = len(nodes)
    stages = []
    for s, name in enumerate(nodes):
        start, end = bounds[s], bounds[s + 1]
        node = inventory.node(name)
        weights = weight_bytes(profile, start, end)
        memory = memory_bytes(profile, workload, start, end)
        transfer_batch = transfer_single = hop = 0.0
        if count > 1:
            after = nodes[(s + 1) % count]
            mbps = inventory.mbps(name, after)
            if s < count - 1:
                transfer_batch = activation_seconds(profile, mbps, batch=workload.max_sequences)
                transfer_single = activation_seconds(profile, mbps, batch=1)
            else:
                transfer_batch = token_ids_seconds(mbps, batch=workload.max_sequences)
                transfer_single = token_ids_seconds(mbps, batch=1)
            hop = hop_seconds(inventory.rtt_ms(name, after))
        batch, span = workload.max_sequences, end - start
        stages.append(
            StageCost(
                node=name,
                layer_start=start,
                layer_end=end,
                has_embedding=s == 0,
                has_head=s == count - 1,
                weight_bytes=weights,
                memory_bytes=memory,
                host_memory_bytes=host_memory(node, workload, memory),
                device=stage_device(node, workload),
                dtype=stage_dtype(node, workload),
                fits=memory <= stage_budget(node, workload),
                compute_batch=compute_seconds(
                    profile, node, weights, batch=batch, workload=workload, layers=span
                ),
                compute_single=compute_seconds(
                    profile, node, weights, batch=1, workload=workload, layers=span
                ),
                transfer_batch=transfer_batch,
                transfer_single=transfer_single,
                hop=hop,
                prefill=prefill_seconds(profile, node, weights, workload=workload),
            )
        )
    return ChainCost(
        stages=tuple(stages),
        bottleneck_seconds=max(max(st.compute_batch, st.transfer_batch) for st in stages),
        token_latency_seconds=sum(st.compute_single + st.transfer_single + st.hop for st in stages),
        time_to_first_token_seconds=_first_token(profile, inventory, workload, nodes, stages),
    )


def _first_token(
    profile: profiles.ModelProfile,
    inventory: inv.Inventory,
    workload: Workload,
    nodes: Sequence[str],
    stages: Sequence[StageCost],
) -> float:
    """Every stage's prefill, the prompt's hidden states down the chain, and the first
    sampled token back to stage 0 (hop times included)."""
    total = sum(st.prefill for st in stages)
    for s, st in enumerate(stages[:-1]):
        mbps = inventory.mbps(nodes[s], nodes[s + 1])
        total += activation_seconds(profile, mbps, batch=workload.prompt) + st.hop
    if len(stages) > 1:
        total += token_ids_seconds(inventory.mbps(nodes[-1], nodes[0]), batch=1) + stages[-1].hop
    return total


def _check_chain(
    profile: profiles.ModelProfile, nodes: Sequence[str], bounds: Sequence[int]
) -> None:
    if not nodes or len(bounds) != len(nodes) + 1:
        raise ValueError("a chain needs one more bound than nodes, and at least one node")
    if bounds[0] != 0 or bounds[-1] != profile.num_layers:
        raise ValueError(f"bounds must run from 0 to {profile.num_layers}, got {list(bounds)}")
    if any(b >= c for b, c in itertools.pairwise(bounds)):
        raise ValueError(f"every stage needs at least one layer, got bounds {list(bounds)}")
    if len(set(nodes)) != len(nodes):
        raise ValueError(f"a node may hold one stage only, got {list(nodes)}")


def human_bytes(size: float) -> str:
    """`13.5 GiB`, `386 MiB`: how the CLI and error messages print memory."""
    if abs(size) >= 2**30:
        return f"{size / 2**30:.1f} GiB"
    if abs(size) >= 2**20:
        return f"{size / 2**20:.0f} MiB"
    if abs(size) >= 2**10:
        return f"{size / 2**10:.0f} KiB"
    return f"{size:.0f} B"
