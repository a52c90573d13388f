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
    first_stage_bytes: int = 0
    """D, what stage 0 holds beside its layers: a draft model's weights and KV cache
    (`draft_bytes`, spec.model.draft); 0 without one."""

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be throughput or latency, got {self.objective!r}")
        for field in ("max_sequences", "max_context_tokens"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if self.first_stage_bytes < 0:
            raise ValueError(f"first_stage_bytes must be >= 0, got {self.first_stage_bytes}")
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
    """compute_s(b): one micro-batch of b = S / K tokens (K = the stage count)."""
    compute_single: float
    """compute_s(1)"""
    transfer_batch: float
    """xfer_s(b), to the next stage (the last stage: token ids back to stage 0)."""
    transfer_single: float
    hop: float
    prefill: float = 0.0
    """prefill_s(P): the stage's share of a P-token prompt's first pass."""
    message: float = 0.0
    """m_s: the node's CPU time per message hop (0 for a one-stage pipeline)."""

    @property
    def busy_batch(self) -> float:
        """What one micro-batch keeps the stage busy: max(compute_s(b) + m_s, xfer_s(b))."""
        return max(self.compute_batch + self.message, self.transfer_batch)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChainCost:
    stages: tuple[StageCost, ...]
    bottleneck_seconds: float
    """T = K x max over stages of max(compute_s(b) + m_s, xfer_s(b)): one round, in which
    each of the K micro-batches of b = S / K tokens passes every stage once"""
    token_latency_seconds: float
    """Λ = sum over stages of compute_s(1) + xfer_s(1) + hop_s + m_s"""
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
    """memory_s = weights_s + S * C * kvBytesPerTokenPerLayer * (end - start) + R, plus D
    (the draft model) for stage 0."""
    kv = workload.kv_tokens * profile.kv_bytes_per_token_per_layer * (end - start)
    first = workload.first_stage_bytes if start == 0 else 0
    return weight_bytes(profile, start, end) + kv + first + workload.runtime_overhead_bytes


def draft_weight_bytes(draft: profiles.ModelProfile) -> int:
    """The draft model whole: every layer, the embeddings and the head (as a one-stage
    pipeline of it is planned)."""
    return draft.total_weight_bytes


def draft_kv_bytes(draft: profiles.ModelProfile, workload: Workload) -> int:
    """The draft model's KV cache: S sequences of C tokens in each of its layers (stage 0
    keeps one draft cache per sequence, preallocated like its own)."""
    return workload.kv_tokens * draft.kv_bytes_per_token_per_layer * draft.num_layers


def draft_bytes(draft: profiles.ModelProfile, workload: Workload) -> int:
    """D = the draft model's weights + its KV cache: what stage 0 holds for it."""
    return draft_weight_bytes(draft) + draft_kv_bytes(draft, workload)


def with_draft(workload: Workload, draft: profiles.ModelProfile | None) -> Workload:
    """The workload with stage 0 holding `draft` (D = `draft_bytes`); as is for None."""
    if draft is None:
        return workload
    return dataclasses.replace(workload, first_stage_bytes=draft_bytes(draft, workload))


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


# fixed costs: what a step costs beyond its bytes ----------------------------------------

DEFAULT_LAYER_FLOP = 8e6
"""f x the node's CPU FLOP/s for a node the probe has not measured: per decoder layer and
step, the small ops cost what 8 MFLOP at the node's dense rate take (probe v2 on one core
of the development VM: f = 0.14 ms beside 57.7 GFLOP/s; docs/planning.md)."""
DEFAULT_LAYER_TOKEN_FLOP = 0.25e6
"""g x CPU FLOP/s: per layer and token of the micro-batch (same run: 4.1 us)."""
DEFAULT_STEP_FLOP = 17e6
"""h x CPU FLOP/s: the runtime's work around a step's layers (same run: 0.29 ms)."""
DEFAULT_HOP_FLOP = 38e6
"""m x CPU FLOP/s: one gRPC message hop, send + receive of a small micro-batch (same run:
0.67 ms)."""


def default_timings(node: inv.Node) -> inv.Timings:
    """The fixed costs of a node the probe has not measured, from its CPU's compute figure
    (`node.tflops`): they are host-side work (Python dispatch, small ops, kernel launches on
    a GPU node too), so they scale with the host's speed; no product curve (the roofline)."""
    flops = node.tflops * 1e12
    return inv.Timings(
        layer_seconds=DEFAULT_LAYER_FLOP / flops,
        layer_token_seconds=DEFAULT_LAYER_TOKEN_FLOP / flops,
        step_seconds=DEFAULT_STEP_FLOP / flops,
        hop_seconds=DEFAULT_HOP_FLOP / flops,
    )


def timings(node: inv.Node) -> inv.Timings:
    """The node's measured fixed costs, each one not given from `default_timings`."""
    default = default_timings(node)
    given = node.timings
    if given is None:
        return default
    return inv.Timings(
        layer_seconds=_given(given.layer_seconds, default.layer_seconds),
        layer_token_seconds=_given(given.layer_token_seconds, default.layer_token_seconds),
        step_seconds=_given(given.step_seconds, default.step_seconds),
        hop_seconds=_given(given.hop_seconds, default.hop_seconds),
        products=given.products,
    )


def _given(value: float | None, default: float | None) -> float:
    return float(value if value is not None else default or 0.0)


def product_curve(points: Sequence[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """A measured (tokens, seconds per weight byte) curve made physical: sorted by tokens,
    a call never cheaper with more tokens (r non-decreasing) and never dearer per token
    (r / tokens non-increasing). Measurements are noisy; these two properties are what
    make K micro-batches of S / K tokens never cheaper than one of S (the search relies on
    it, docs/planning.md)."""
    out: list[tuple[float, float]] = []
    for tokens, rate in sorted((float(t), float(r)) for t, r in points if t > 0 and r > 0):
        if out:
            before_tokens, before = out[-1]
            if tokens == before_tokens:
                continue
            rate = min(max(rate, before), before * tokens / before_tokens)
        out.append((tokens, rate))
    return tuple(out)


def curve_rate(points: Sequence[tuple[float, float]], batch: float) -> float:
    """r(batch) on a `product_curve`: its first rate below the first point, linear between
    points, and the last point's rate per token beyond the last."""
    first_tokens, first = points[0]
    if batch <= first_tokens:
        return first
    for (t0, r0), (t1, r1) in itertools.pairwise(points):
        if batch <= t1:
            return r0 + (r1 - r0) * (batch - t0) / (t1 - t0)
    last_tokens, last = points[-1]
    return last * batch / last_tokens


def product_seconds_per_byte(
    profile: profiles.ModelProfile, node: inv.Node, workload: Workload, *, batch: float
) -> float:
    """r(batch), seconds per stored weight byte of a step of `batch` tokens: the probe's
    measured product curve on a CPU stage, else the roofline of the device's figures,
    max(1 / bandwidth, 2 FLOPs per param x batch / FLOP/s)."""
    curve = timings(node).products
    if curve and stage_device(node, workload) == "cpu":
        return curve_rate(product_curve(curve), batch)
    tflops, bandwidth = speeds(node, workload)
    per_param = 2 / profile.weight_bytes_per_param
    return max(1 / (bandwidth * 1e9), per_param * batch / (tflops * 1e12))


def fixed_seconds(node: inv.Node, *, batch: float, layers: int) -> float:
    """fixed_s(batch) = h + layers x (f + g x batch): what a step of `batch` tokens
    over `layers` decoder layers costs whatever their width."""
    t = timings(node)
    return _given(t.step_seconds, 0) + layers * (
        _given(t.layer_seconds, 0) + _given(t.layer_token_seconds, 0) * batch
    )


def message_seconds(node: inv.Node) -> float:
    """m: the node's CPU time for one message hop (a stage receives and sends one per
    micro-batch; counted when the pipeline has more than one stage)."""
    return _given(timings(node).hop_seconds, 0)


def compute_seconds(
    profile: profiles.ModelProfile,
    node: inv.Node,
    weights: int,
    *,
    batch: float,
    workload: Workload,
    layers: int = 0,
) -> float:
    """compute_s(batch): one step of `batch` tokens on the stage's device, what the stage's
    `llmpipe_stage_compute_seconds` measures: its weights at r(batch) seconds per byte, each
    sequence's KV cache at the average context in each of its `layers`, and the fixed
    costs (`fixed_seconds`)."""
    products = weights * product_seconds_per_byte(profile, node, workload, batch=batch)
    kv = kv_read_seconds(profile, node, workload, batch=batch, layers=layers)
    return products + kv + fixed_seconds(node, batch=batch, layers=layers)


def kv_read_seconds(
    profile: profiles.ModelProfile,
    node: inv.Node,
    workload: Workload,
    *,
    batch: float,
    layers: int,
) -> float:
    """kv_s(batch) = batch * Ĉ * kvBytesPerTokenPerLayer * layers / bandwidth."""
    _, bandwidth = speeds(node, workload)
    kv_bytes = batch * workload.average_context * profile.kv_bytes_per_token_per_layer * layers
    return kv_bytes / (bandwidth * 1e9)


def prefill_seconds(
    profile: profiles.ModelProfile,
    node: inv.Node,
    weights: int,
    *,
    workload: Workload,
    layers: int = 0,
) -> float:
    """prefill_s(P): a P-token prompt in one pass, the weights at r(P) seconds per byte
    plus the fixed costs of one step (attention over the prompt itself is not counted:
    beside the weights' FLOPs it is small while P is well below 6 x the hidden size)."""
    products = weights * product_seconds_per_byte(profile, node, workload, batch=workload.prompt)
    return products + fixed_seconds(node, batch=0, layers=layers)


def activation_seconds(profile: profiles.ModelProfile, mbps: float, *, batch: float) -> float:
    """xfer_s for s < last: the hidden state of `batch` tokens to the next stage."""
    return 8 * batch * profile.hidden_size * profile.activation_bytes / (mbps * 1e6)


def token_ids_seconds(mbps: float, *, batch: float) -> float:
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
    batch = micro_batch(workload, count)
    stages = []
    for s, name in enumerate(nodes):
        start, end = bounds[s], bounds[s + 1]
        node = inventory.node(name)
        weights = weight_bytes(profile, start, end)
        memory = memory_bytes(profile, workload, start, end)
        transfer_batch = transfer_single = hop = message = 0.0
        if count > 1:
            after = nodes[(s + 1) % count]
            mbps = inventory.mbps(name, after)
            if s < count - 1:
                transfer_batch = activation_seconds(profile, mbps, batch=batch)
                transfer_single = activation_seconds(profile, mbps, batch=1)
            else:
                transfer_batch = token_ids_seconds(mbps, batch=batch)
                transfer_single = token_ids_seconds(mbps, batch=1)
            hop = hop_seconds(inventory.rtt_ms(name, after))
            message = message_seconds(node)
        span = end - start
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
                prefill=prefill_seconds(profile, node, weights, workload=workload, layers=span),
                message=message,
            )
        )
    return ChainCost(
        stages=tuple(stages),
        bottleneck_seconds=count * max(st.busy_batch for st in stages),
        token_latency_seconds=sum(
            st.compute_single + st.transfer_single + st.hop + st.message for st in stages
        ),
        time_to_first_token_seconds=_first_token(profile, inventory, workload, nodes, stages),
    )


def micro_batch(workload: Workload, count: int) -> float:
    """b = S / K: stage 0 keeps one micro-batch per stage in the ring (the coordinator's
    default), so K = the stage count and each micro-batch carries S / K sequences."""
    return workload.max_sequences / count


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
        total += activation_seconds(profile, mbps, batch=workload.prompt) + st.hop + st.message
    if len(stages) > 1:
        back = token_ids_seconds(inventory.mbps(nodes[-1], nodes[0]), batch=1)
        total += back + stages[-1].hop + stages[-1].message
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
