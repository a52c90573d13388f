"""The partition search: which ordered chain of nodes holds which layers.

- `exact`: dynamic programming over (used nodes, last node, layers covered), once per
  first node; every ordered subset and every split is covered, so the result is the
  optimum of cost model v2. Time O(2^n n^2 L log L), memory O(2^n n L) for n nodes and L
  layers: fine up to about 8 nodes (2^n masks), linear-logarithmic in the layers.
- `heuristic`: for larger clusters. Bisection on the bottleneck with a greedy chain that
  always takes the node reaching furthest, exact DP on small subsets of the strongest
  nodes, and an exact re-split of every candidate chain.
- `lower_bound`: a bound no plan can beat, so a heuristic plan reports how far it may be
  from the optimum.

Costs are linear in what a stage holds (cost model v2: compute_s = weights_s x the node's
seconds per stored byte at the batch + span_s x its seconds per layer of KV cache read,
`Rates`), and both grow with its layer span, so the best start of a stage for every end
comes from range minima over prefix sums (`_advance`), never from an all-pairs (L+1)^2
table. Pure.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from llmpipe_operator.planning import cost, profiles
from llmpipe_operator.planning import inventory as inv

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]
Combine = Literal["max", "sum"]
INF = math.inf


@dataclasses.dataclass(frozen=True, kw_only=True)
class Chain:
    """Stage s on nodes[s] (an index into Problem.names) holding [bounds[s], bounds[s+1])."""

    nodes: tuple[int, ...]
    bounds: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Rates:
    """A stage [b, c) on node n costs
    weight(b, c) * per_byte[n] + (c - b) * per_layer[n] + per_stage[n]."""

    per_byte: FloatArray
    """Seconds per stored weight byte (`cost.product_seconds_per_byte`), per round."""
    per_layer: FloatArray
    """Seconds per layer per round: the KV cache read at the average context plus the
    fixed per-layer costs (`cost.fixed_seconds`)."""
    per_stage: FloatArray
    """Seconds per stage per round: the step's fixed cost, and its message hop's."""

    def stage(
        self, rows: IntArray, weights: npt.NDArray[Any], spans: npt.NDArray[Any]
    ) -> FloatArray:
        """Costs of stages of rows' nodes; weights and spans broadcast against [R, 1]."""
        p, q = self.per_byte[rows][:, None], self.per_layer[rows][:, None]
        return np.asarray(weights * p + spans * q + self.per_stage[rows][:, None])


@dataclasses.dataclass(frozen=True, kw_only=True)
class SearchSettings:
    """Knobs of the heuristic; the defaults meet the planning-time targets of issue 2."""

    exact_limit: int = 8
    """Up to this many eligible nodes the search is exact: 2^8 masks take ~0.1 s."""
    subset_size: int = 5
    """Nodes in each strong subset searched exactly above the limit; 5 keeps one subset
    search near 5 ms so that 128 nodes plan in well under 100 ms."""
    bisection_tolerance: float = 1e-3
    """Stop bisecting on the bottleneck when the interval is within 0.1 %."""
    bisection_steps: int = 40
    """Upper bound on the greedy chains built per bisection."""
    improve_rounds: int = 3
    """Rounds of local search at the bottleneck; each round tries a handful of moves."""
    improve_candidates: int = 3
    """Fastest unused nodes tried per round: 3 x 3 moves keep 128 nodes under 100 ms."""


class Problem:
    """The planning instance as arrays over the eligible nodes."""

    def __init__(
        self,
        profile: profiles.ModelProfile,
        inventory: inv.Inventory,
        workload: cost.Workload,
        *,
        nodes: Sequence[inv.Node],
        first_edge: bool,
        last_edge: bool,
        max_stages: int,
        micro_batches: int = 1,
    ) -> None:
        """`micro_batches` is K of cost model v2: the batch rates cost one round of K
        micro-batches of S / K tokens, exact for chains of K stages and an overestimate
        for shorter ones (`planner` searches every K; docs/planning.md)."""
        self.profile, self.inventory, self.workload = profile, inventory, workload
        self.names = [n.name for n in nodes]
        self.size = len(nodes)
        self.layers = profile.num_layers
        self.max_stages = max_stages
        self.micro_batches = micro_batches
        rounds = float(micro_batches)
        batch = workload.max_sequences / rounds
        # the device each stage computes on: a node's GPU when the stage uses it
        bandwidth = np.array([cost.speeds(n, workload)[1] * 1e9 for n in nodes])
        timings = [cost.timings(n) for n in nodes]

        def rate(b: float) -> FloatArray:
            return np.array(
                [cost.product_seconds_per_byte(profile, n, workload, batch=b) for n in nodes]
            )

        layer = np.array([t.layer_seconds or 0.0 for t in timings])
        token = np.array([t.layer_token_seconds or 0.0 for t in timings])
        step = np.array([t.step_seconds or 0.0 for t in timings])
        self.message = np.array([t.hop_seconds or 0.0 for t in timings])
        # seconds per stored byte: compute_s(batch) = weights_s * per_byte(batch), per round
        self.per_byte_batch = rounds * rate(batch)
        self.per_byte_single = rate(1.0)
        # per layer: KV cache read (batch x average context x bytes per token) + fixed costs
        kv_read = workload.average_context * profile.kv_bytes_per_token_per_layer
        hops = self.message if micro_batches > 1 else np.zeros(self.size)
        self.batch_rates = Rates(
            self.per_byte_batch,
            rounds * (batch * kv_read / bandwidth + layer + token * batch),
            rounds * (step + hops),
        )
        self.single_rates = Rates(self.per_byte_single, kv_read / bandwidth + layer + token, step)
        self.capacity = np.array(
            [cost.stage_budget(n, workload) - workload.runtime_overhead_bytes for n in nodes],
            dtype=np.float64,
        )
        edge = np.array([n.tier == "edge" for n in nodes])
        everyone = np.ones(self.size, dtype=bool)
        self.first_ok: BoolArray = edge if first_edge else everyone
        self.last_ok: BoolArray = edge if last_edge else everyone
        self.uplink = np.array([n.uplink_mbps for n in nodes])
        self.tier = np.array([0 if n.tier == "edge" else 1 for n in nodes])
        self.rtt_table = np.array(
            [[inventory.rtt_ms_defaults[inv.tier_pair(a, b)] for b in inv.TIERS] for a in inv.TIERS]
        )
        index = {name: i for i, name in enumerate(self.names)}
        self.overrides: dict[int, list[tuple[int, float, float]]] = {}
        for link in inventory.links:
            if link.a in index and link.b in index:
                i, j = index[link.a], index[link.b]
                self.overrides.setdefault(i, []).append((j, link.mbps, link.rtt_ms))
                self.overrides.setdefault(j, []).append((i, link.mbps, link.rtt_ms))
        layer_prefix = np.concatenate(([0.0], np.cumsum(profile.layer_bytes, dtype=np.float64)))
        self.kv_per_layer = float(workload.kv_tokens * profile.kv_bytes_per_token_per_layer)
        # A stage [b, c) weighs ends[c] - starts[b] and needs mem_ends[c] - mem_starts[b]
        # (memory less R). All four are integer-valued float64 (exact below 2^53 bytes), so
        # these differences equal cost.weight_bytes / memory_bytes bit for bit. O(L) each:
        # nothing here is quadratic in the layer count.
        span = np.arange(self.layers + 1, dtype=np.float64)
        self.starts = layer_prefix.copy()
        self.starts[0] -= profile.embed_bytes
        self.ends = layer_prefix.copy()
        self.ends[self.layers] += profile.head_bytes
        self.mem_starts = self.starts + self.kv_per_layer * span
        self.mem_starts[0] -= workload.first_stage_bytes  # D: stage 0's draft model
        self.mem_ends = self.ends + self.kv_per_layer * span
        self._dense: tuple[FloatArray, FloatArray, BoolArray] | None = None
        self._stage_costs: dict[tuple[int, bool], FloatArray] = {}

    def dense_spans(self) -> tuple[FloatArray, FloatArray, BoolArray]:
        """weights[b, c - 1] and layers[b, c - 1] of the stage [b, c) and whether b < c, for
        the dense path of `_advance` (built once per problem: [L, L] each, only for models
        it serves)."""
        if self._dense is None:
            end = self.layers
            weights = self.ends[None, 1:] - self.starts[:end, None]  # [b, c]
            spans = (np.arange(1, end + 1)[None, :] - np.arange(end)[:, None]).astype(np.float64)
            before = spans > 0  # [b, c]
            self._dense = (weights, spans, before)
        return self._dense

    def rates(self, *, single: bool) -> Rates:
        return self.single_rates if single else self.batch_rates

    def stage_costs(self, node: int, *, single: bool) -> FloatArray | None:
        """compute_s of `node` holding [b, c) for every b, c ([L + 1, L + 1]; inf where it
        does not fit or b >= c), kept for the heuristic's many re-splits of small models.
        None once the kept matrices would pass STAGE_COST_CELLS: the caller then takes the
        near-linear path, so memory never grows with layers^2 x nodes unbounded."""
        key = (node, single)
        cached = self._stage_costs.get(key)
        if cached is not None:
            return cached
        cells = (self.layers + 1) ** 2
        if cells * (len(self._stage_costs) + 1) > STAGE_COST_CELLS:
            return None
        weights = self.ends[None, :] - self.starts[:, None]  # [b, c]
        needs = self.mem_ends[None, :] - self.mem_starts[:, None]  # [b, c]
        order = np.arange(self.layers + 1)
        fits = (order[:, None] < order[None, :]) & (needs <= self.capacity[node])
        spans = (order[None, :] - order[:, None]).astype(np.float64)  # [b, c]
        rates = self.rates(single=single)
        stage = weights * rates.per_byte[node] + spans * rates.per_layer[node]
        costs = np.where(fits, stage + rates.per_stage[node], INF)
        self._stage_costs[key] = costs
        return costs

    def weight(self, start: int, end: int) -> float:
        """weights_s of a stage holding [start, end)."""
        return float(self.ends[end] - self.starts[start])

    def memory(self, start: int, end: int) -> float:
        """memory_s - R of a stage holding [start, end)."""
        return float(self.mem_ends[end] - self.mem_starts[start])

    # links ---------------------------------------------------------------------------

    def mbps_row(self, u: int) -> FloatArray:
        row: FloatArray = np.minimum(self.uplink[u], self.uplink)
        for j, mbps, _ in self.overrides.get(u, ()):
            row[j] = mbps
        return row

    def rtt_row(self, u: int) -> FloatArray:
        row: FloatArray = self.rtt_table[self.tier[u], self.tier].astype(np.float64)
        for j, _, rtt in self.overrides.get(u, ()):
            row[j] = rtt
        return row

    def forward_row(self, u: int, *, batch: int, with_hop: bool) -> FloatArray:
        """xfer_u(batch) (+ hop_u + m_u) for every possible next node."""
        act = self.profile.hidden_size * self.profile.activation_bytes
        seconds = 8 * batch * act / (self.mbps_row(u) * 1e6)
        return seconds + self._hop(u) if with_hop else seconds

    def return_row(self, u: int, *, batch: int, with_hop: bool) -> FloatArray:
        """xfer_last(batch) (+ hop + m_u) from u back to every possible stage 0."""
        seconds = 8 * batch * profiles.TOKEN_ID_BYTES / (self.mbps_row(u) * 1e6)
        return seconds + self._hop(u) if with_hop else seconds

    def _hop(self, u: int) -> FloatArray:
        """hop_u + m_u: half the round trip, and the sender's CPU time for the message
        (the latency objective's share of it: the edges exist only between stages)."""
        return np.asarray(self.rtt_row(u) / 2 / 1000 + self.message[u])

    def edge_matrices(self, members: list[int], *, single: bool) -> tuple[FloatArray, FloatArray]:
        """(forward[u, v], return[u, f]) among members, at batch S (throughput) or at
        batch 1 plus the hop (latency); indices are positions in `members`."""
        batch = 1 if single else self.workload.max_sequences
        forward = np.array(
            [self.forward_row(u, batch=batch, with_hop=single)[members] for u in members]
        )
        back = np.array(
            [self.return_row(u, batch=batch, with_hop=single)[members] for u in members]
        )
        np.fill_diagonal(forward, INF)
        np.fill_diagonal(back, INF)
        return forward, back

    # costing a chain ---------------------------------------------------------------

    def evaluate(self, chain: Chain) -> cost.ChainCost:
        return cost.evaluate(
            self.profile,
            self.inventory,
            self.workload,
            nodes=[self.names[i] for i in chain.nodes],
            bounds=chain.bounds,
        )


def score(problem: Problem, chain: Chain) -> tuple[float, float]:
    """(objective, the other objective): lower is better; the second breaks ties."""
    costed = problem.evaluate(chain)
    pair = (costed.bottleneck_seconds, costed.token_latency_seconds)
    return pair if problem.workload.objective == "throughput" else (pair[1], pair[0])


# one stage more: the transition every search shares -----------------------------------
#
# Given arrive[r, b] (the best cost of covering [0, b) and handing over to row r's node),
# `advance` finds for every end c the best start b of that node's stage [b, c):
#
#   sum: min over b of arrive[b] + w(b, c) * p   = p * ends[c] + min(arrive[b] - p * starts[b])
#   max: min over b of max(arrive[b], w(b, c) * p)
#
# over the window of starts that fit (memory, and the bottleneck limit of a tie-break
# pass): w(b, c) shrinks as b grows, so the window is [lo(c), c - 1] with lo(c)
# non-decreasing. Sum is a range minimum; max uses that min over b >= b' of arrive is
# non-decreasing in b' while w(b', c) falls, so the optimum sits where the two cross, found
# by bisection. Range minima come from a sparse table: O(L log L) per call, never L^2.


def _table(values: FloatArray) -> tuple[FloatArray, IntArray]:
    """Sparse table over values[r, i]: level k holds min and argmin of [i, i + 2^k)."""
    rows, width = values.shape
    levels = max(1, int(width).bit_length())
    mins = np.full((levels, rows, width), INF)
    args = np.zeros((levels, rows, width), dtype=np.int64)
    mins[0] = values
    args[0] = np.arange(width)
    for k in range(1, levels):
        half, size = 1 << (k - 1), width - (1 << k) + 1
        if size <= 0:
            break
        left, right = mins[k - 1, :, :size], mins[k - 1, :, half : half + size]
        take = right < left  # ties keep the smaller index
        mins[k, :, :size] = np.where(take, right, left)
        args[k, :, :size] = np.where(
            take, args[k - 1, :, half : half + size], args[k - 1, :, :size]
        )
    return mins, args


def _query(
    table: tuple[FloatArray, IntArray], lo: IntArray, hi: IntArray
) -> tuple[FloatArray, IntArray]:
    """min and argmin of values[r, lo:hi + 1] for every query (lo <= hi, shape [R, C])."""
    mins, args = table
    length = hi - lo + 1
    level = np.maximum(np.frexp(length.astype(np.float64))[1] - 1, 0)
    other = hi - (1 << level) + 1
    row = np.arange(lo.shape[0])[:, None]
    left_min, right_min = mins[level, row, lo], mins[level, row, other]
    take = right_min < left_min
    return (
        np.where(take, right_min, left_min),
        np.where(take, args[level, row, other], args[level, row, lo]),
    )


def _window(problem: Problem, rows: IntArray, limit: float | None) -> IntArray:
    """lo[r, c - 1]: the first start b whose stage [b, c) fits row r's node (memory, and
    compute at batch S <= limit when a limit is given); c - 1 < lo when none does."""
    ends = np.arange(1, problem.layers + 1)
    need = problem.mem_ends[None, 1:] - problem.capacity[rows][:, None]
    lo = np.searchsorted(problem.mem_starts, need, side="left")
    if limit is not None:
        rates = problem.batch_rates

        def within(b: IntArray) -> BoolArray:
            weights = problem.ends[None, 1:] - problem.starts[b]
            return np.asarray(rates.stage(rows, weights, ends[None, :] - b) <= limit)

        # p (ends[c] - starts[b]) + q (c - b) <= limit  <=>  keyed[b] >= target[c], with
        # keyed = p starts + q b increasing in b: one binary search per distinct node
        lo_limit = np.zeros((len(rows), problem.layers), dtype=np.int64)
        index = np.arange(problem.layers + 1)
        for node in np.unique(rows):
            p, q = rates.per_byte[node], rates.per_layer[node]
            target = p * problem.ends[1:] + q * ends + rates.per_stage[node] - limit
            lo_limit[rows == node] = np.searchsorted(p * problem.starts + q * index, target)
        lo_limit = np.minimum(lo_limit, ends[None, :])
        # the rearrangement may round; settle the edge with the exact comparison
        while True:
            back = (lo_limit > 0) & within(np.maximum(lo_limit - 1, 0))
            ahead = (lo_limit < ends) & ~within(np.minimum(lo_limit, problem.layers - 1))
            if not (back.any() or ahead.any()):
                break
            lo_limit = lo_limit - back + ahead
        lo = np.maximum(lo, lo_limit)
    return np.asarray(lo, dtype=np.int64)


def _advance(
    problem: Problem,
    arrive: FloatArray,
    rows: IntArray,
    *,
    rates: Rates,
    how: Combine,
    limit: float | None = None,
) -> tuple[FloatArray, IntArray]:
    """(value[r, c], start[r, c]) for c in [0, L]: row r's node holds [start, c) after
    arrive[r, :] (shape [R, L], the cost of [0, b) delivered to that node)."""
    end = problem.layers
    lo = _window(problem, rows, limit)
    hi = np.broadcast_to(np.arange(end), lo.shape)
    valid = lo <= hi
    lo_q = np.minimum(lo, hi)
    ends = np.arange(1, end + 1)[None, :]

    def stage(b: IntArray) -> FloatArray:
        return rates.stage(rows, problem.ends[None, 1:] - problem.starts[b], ends - b)

    if len(rows) * end * end <= DENSE_CELLS:
        start = _best_start_dense(problem, arrive, lo, rows, rates, how)
    elif how == "sum":
        # arrive[b] + p (ends[c] - starts[b]) + q (c - b): the part that depends on b
        before = rates.stage(rows, problem.starts[None, :end], np.arange(end)[None, :])
        keyed = np.asarray(arrive - before)
        _, start = _query(_table(keyed), lo_q, hi)
    else:
        start = _crossing(_table(arrive), lo_q, hi, stage)
    row = np.arange(len(rows))[:, None]
    value = _combine(how, arrive[row, start], stage(start))
    value = np.where(valid & np.isfinite(value), value, INF)
    out_value = np.full((len(rows), end + 1), INF)
    out_start = np.zeros((len(rows), end + 1), dtype=np.int64)
    out_value[:, 1:], out_start[:, 1:] = value, start
    return out_value, out_start


STAGE_COST_CELLS = 2**22
"""Cells of the per-node stage-cost matrices a problem keeps (32 MiB): an 80-layer model's
matrices for ~600 (node, objective) pairs, a 1,024-layer model's for four."""

DENSE_CELLS = 2**19
"""Up to this many (row, start, end) cells `_advance` compares every start at once: for
small models a few numpy calls over the cells beat the ~150 calls of the range-minimum
path. 2^19 cells (4 MiB a table) keeps the dense path to models of at most ~700 layers
on one row, so the search stays near-linear in the layers (the unit tests check both
paths against brute force)."""


def _best_start_dense(
    problem: Problem, arrive: FloatArray, lo: IntArray, rows: IntArray, rates: Rates, how: Combine
) -> IntArray:
    """start[r, c - 1] = argmin over b in [lo, c) of combine(arrive[r, b], cost_r(b, c))."""
    weights, spans, before = problem.dense_spans()  # [b, c] each
    starts = np.arange(problem.layers)[None, :, None]  # [1, b, 1]
    inside = before[None] & (starts >= lo[:, None, :])  # [R, b, c]
    p = rates.per_byte[rows][:, None, None]
    q = rates.per_layer[rows][:, None, None]
    stage = weights[None] * p + spans[None] * q + rates.per_stage[rows][:, None, None]
    total = np.where(inside, _combine(how, arrive[:, :, None], stage), INF)
    best = total.argmin(axis=1)
    # nothing reachable: a start inside the window, whose cost the caller finds infinite
    fallback = np.minimum(lo, np.arange(problem.layers)[None, :])
    return np.asarray(np.where(np.isfinite(total.min(axis=1)), best, fallback), dtype=np.int64)


def _crossing(
    table: tuple[FloatArray, IntArray],
    lo: IntArray,
    hi: IntArray,
    stage: Callable[[IntArray], FloatArray],
) -> IntArray:
    """argmin over b in [lo, hi] of max(arrive[b], stage(b)) (see the note above)."""
    left, right = lo.copy(), hi + 1  # the first b with suffix-min >= stage(b); hi+1: none
    while True:
        active = left < right
        if not active.any():
            break
        middle = np.where(active, (left + right) // 2, left)
        suffix, _ = _query(table, np.minimum(middle, hi), hi)
        crossed = suffix >= stage(np.minimum(middle, hi))
        right = np.where(active & crossed, middle, right)
        left = np.where(active & ~crossed, middle + 1, left)
    at = np.minimum(left, hi)
    here, here_arg = _query(table, at, hi)
    here = np.where(left <= hi, here, INF)
    before = np.maximum(left - 1, lo)
    _, before_arg = _query(table, before, hi)
    before_value = np.where(left - 1 >= lo, stage(before), INF)
    return np.where(before_value < here, before_arg, here_arg)


# exact search ----------------------------------------------------------------------


def exact(problem: Problem, *, subset: Sequence[int] | None = None) -> Chain | None:
    """The optimal chain over `subset` (default: all nodes), or None if nothing fits.

    Throughput: first the least bottleneck T*, then among chains with bottleneck <= T*
    the least token latency. Latency: the least token latency.
    """
    members = list(range(problem.size)) if subset is None else list(subset)
    fwd_single, ret_single = problem.edge_matrices(members, single=True)
    if problem.workload.objective == "latency":
        found = _dp(problem, members, problem.single_rates, fwd_single, ret_single, "sum")
        return None if found is None else found[1]
    fwd_batch, ret_batch = problem.edge_matrices(members, single=False)
    found = _dp(problem, members, problem.batch_rates, fwd_batch, ret_batch, "max")
    if found is None:
        return None
    best = found[0]
    tied = _dp(
        problem,
        members,
        problem.single_rates,
        np.where(fwd_batch <= best, fwd_single, INF),
        np.where(ret_batch <= best, ret_single, INF),
        "sum",
        limit=best,
    )
    return found[1] if tied is None else tied[1]


def _combine(how: Combine, a: FloatArray, b: FloatArray) -> FloatArray:
    return np.maximum(a, b) if how == "max" else a + b


def _dp(
    problem: Problem,
    members: list[int],
    rates: Rates,
    forward: FloatArray,
    back: FloatArray,
    how: Combine,
    *,
    limit: float | None = None,
) -> tuple[float, Chain] | None:
    """Min over chains of combine(stage costs, forward edges, return edge).

    best[f, mask, u, c]: the best chain using the nodes in mask, starting at f (stage 0,
    needed for the return edge) and ending with u's stage at layer c. First nodes are
    searched a batch at a time (`DP_BYTES` bounds the table), so time is
    O(2^n n^2 L log L) and memory O(2^n n L) per batch for n members and L layers.
    """
    n, width = len(members), problem.layers + 1
    firsts = [f for f in range(n) if problem.first_ok[members[f]]]
    per_first = (1 << n) * n * width * DP_BYTES_PER_STATE
    batch = max(1, DP_BYTES // per_first)
    found: list[tuple[float, Chain]] = []
    for i in range(0, len(firsts), batch):
        found.extend(
            _dp_batch(problem, members, firsts[i : i + batch], rates, forward, how, limit, back)
        )
    return min(found, key=lambda item: item[0]) if found else None


DP_BYTES = 32 * 2**20
"""Table budget of one exact-search batch: 8 nodes x 1,024 layers need 27 MiB per first
node, so they run one first node at a time; small models batch all first nodes at once
(fewer numpy calls). Keeps the operator far below its 512 MiB limit."""
DP_BYTES_PER_STATE = 8 + 4 + 1
"""float64 cost + int32 start + int8 predecessor."""


def _dp_batch(
    problem: Problem,
    members: list[int],
    firsts: list[int],
    rates: Rates,
    forward: FloatArray,
    how: Combine,
    limit: float | None,
    back: FloatArray,
) -> list[tuple[float, Chain]]:
    n, end, count = len(members), problem.layers, len(firsts)
    nodes = np.array(members)
    best = np.full((count, 1 << n, n, end + 1), INF)
    parent_u = np.zeros((count, 1 << n, n, end + 1), dtype=np.int8)
    parent_b = np.zeros((count, 1 << n, n, end + 1), dtype=np.int32)
    start = np.full((count, end), INF)
    start[:, 0] = 0.0  # nothing covered yet: stage 0 starts at layer 0
    value, _ = _advance(problem, start, nodes[firsts], rates=rates, how=how, limit=limit)
    best[np.arange(count), 1 << np.array(firsts), firsts] = value
    for mask in range(1, 1 << n):
        if mask.bit_count() >= problem.max_stages:
            continue
        which = np.array([k for k, f in enumerate(firsts) if mask >> f & 1])
        inside = np.array([i for i in range(n) if mask >> i & 1])
        outside = np.array([v for v in range(n) if not mask >> v & 1])
        if which.size == 0 or outside.size == 0:
            continue
        current = best[which, mask][:, inside, :end]  # [f, u, b]
        if not np.isfinite(current).any():
            continue
        # via[f, v, u, b]: u's chain handing layer b on to v
        edges = forward[np.ix_(inside, outside)].T  # [v, u]
        via = _combine(how, current[:, None, :, :], edges[None, :, :, None])
        arrive = via.min(axis=2).reshape(-1, end)  # [f * v, b]
        from_u = inside[via.argmin(axis=2)].reshape(-1, end)
        rows = np.tile(nodes[outside], which.size)
        value, begin = _advance(problem, arrive, rows, rates=rates, how=how, limit=limit)
        pred = np.take_along_axis(from_u, np.minimum(begin, end - 1), axis=1)
        shape = (which.size, outside.size, end + 1)
        grown = mask | (1 << outside)
        best[which[:, None], grown[None, :], outside[None, :]] = value.reshape(shape)
        parent_b[which[:, None], grown[None, :], outside[None, :]] = begin.reshape(shape)
        parent_u[which[:, None], grown[None, :], outside[None, :]] = pred.reshape(shape)
    results = []
    for k, f in enumerate(firsts):
        found = _best_ending(problem, members, f, best[k], parent_u[k], parent_b[k], back, how)
        if found is not None:
            results.append(found)
    return results


def _best_ending(
    problem: Problem,
    members: list[int],
    f: int,
    best: FloatArray,
    parent_u: npt.NDArray[np.int8],
    parent_b: npt.NDArray[np.int32],
    back: FloatArray,
    how: Combine,
) -> tuple[float, Chain] | None:
    end = problem.layers
    done = best[:, :, end]  # [mask, u]
    totals = _combine(how, done, back[None, :, f])
    totals[1 << f, f] = done[1 << f, f]  # one stage: no transfer, no hop
    totals[:, ~problem.last_ok[members]] = INF
    flat = int(np.argmin(totals))
    value = float(totals.flat[flat])
    if not math.isfinite(value):
        return None
    mask, u = (int(i) for i in np.unravel_index(flat, totals.shape))
    order, bounds = [u], [end]
    c = end
    while mask != 1 << u:
        b = int(parent_b[mask, u, c])
        prev = int(parent_u[mask, u, c])
        mask, u, c = mask ^ 1 << u, prev, b
        order.append(u)
        bounds.append(c)
    bounds.append(0)
    chain_nodes = tuple(members[i] for i in reversed(order))
    return value, Chain(nodes=chain_nodes, bounds=tuple(reversed(bounds)))


# exact split of a fixed chain -------------------------------------------------------


def resplit(problem: Problem, nodes: Sequence[int]) -> Chain | None:
    """The best split of the layers over exactly these nodes in this order."""
    if problem.workload.objective == "latency":
        found = _chain_dp(problem, nodes, single=True, limit=None)
        return None if found is None else found[1]
    found = _chain_dp(problem, nodes, single=False, limit=None)
    if found is None:
        return None
    tied = _chain_dp(problem, nodes, single=True, limit=found[0])
    return found[1] if tied is None else tied[1]


def _chain_dp(
    problem: Problem, nodes: Sequence[int], *, single: bool, limit: float | None
) -> tuple[float, Chain] | None:
    """Min bottleneck (single=False) or min latency (single=True, bottleneck <= limit).
    O(len(nodes) L log L)."""
    how: Combine = "sum" if single else "max"
    rates = problem.rates(single=single)
    value = np.full(problem.layers + 1, INF)
    value[0] = 0.0
    choices = []
    batch = problem.workload.max_sequences
    for s, v in enumerate(nodes):
        incoming = value[None, : problem.layers].copy()
        if s > 0:
            u = nodes[s - 1]
            edge = problem.forward_row(u, batch=1 if single else batch, with_hop=single)[v]
            if limit is not None:
                slow = problem.forward_row(u, batch=batch, with_hop=False)[v] > limit
                edge = INF if slow else edge
            incoming = _combine(how, incoming, np.full_like(incoming, edge))
        stage = _kept_stage_costs(problem, v, single=single, limit=limit)
        if stage is not None:
            total = _combine(how, np.append(incoming[0], INF)[:, None], stage)  # [b, c]
            choices.append(total.argmin(axis=0))
            value = total.min(axis=0)
            continue
        reached, begin = _advance(
            problem, incoming, np.array([v]), rates=rates, how=how, limit=limit
        )
        choices.append(begin[0])
        value = reached[0]
    result = float(value[problem.layers])
    if len(nodes) > 1:
        last, first = nodes[-1], nodes[0]
        back = problem.return_row(last, batch=1 if single else batch, with_hop=single)[first]
        if limit is not None:
            slow = problem.return_row(last, batch=batch, with_hop=False)[first] > limit
            back = INF if slow else back
        result = max(result, back) if how == "max" else result + back
    if not math.isfinite(result):
        return None
    bounds = [problem.layers]
    for choice in reversed(choices):
        bounds.append(int(choice[bounds[-1]]))
    return result, Chain(nodes=tuple(nodes), bounds=tuple(reversed(bounds)))


def _kept_stage_costs(
    problem: Problem, node: int, *, single: bool, limit: float | None
) -> FloatArray | None:
    """The kept [b, c] stage costs for `_chain_dp`, with stages slower than `limit` at
    batch S ruled out; None when the problem keeps no matrices for this node."""
    stage = problem.stage_costs(node, single=single)
    if stage is None or limit is None:
        return stage
    batch = problem.stage_costs(node, single=False)
    if batch is None:
        return None
    return np.where(batch <= limit, stage, INF)


# heuristic --------------------------------------------------------------------------


def heuristic(problem: Problem, settings: SearchSettings) -> Chain | None:
    """A good feasible chain over many nodes (no optimality guarantee)."""
    candidates: list[Chain] = []
    for subset in _strong_subsets(problem, settings.subset_size):
        found = exact(problem, subset=subset)
        if found is not None:
            candidates.append(found)
    for chain in _bisect_bottleneck(problem, settings):
        better = resplit(problem, chain.nodes)
        candidates.append(chain if better is None else better)
    if not candidates:
        return None
    best = min(candidates, key=lambda chain: score(problem, chain))
    return _improve(problem, best, settings) if problem.workload.objective == "throughput" else best


def _improve(problem: Problem, chain: Chain, settings: SearchSettings) -> Chain:
    """Local search at the bottleneck: put one of the fastest unused nodes next to the
    bottleneck stage or in its place, re-split exactly, keep what scores better."""
    best, best_score = chain, score(problem, chain)
    for _ in range(settings.improve_rounds):
        costed = problem.evaluate(best).stages
        worst = max(
            range(len(costed)),
            key=lambda s: max(costed[s].compute_batch, costed[s].transfer_batch),
        )
        improved = False
        for order in _moves(problem, list(best.nodes), worst, settings.improve_candidates):
            # the bottleneck alone decides a move; the latency tie-break runs once at the end
            found = _chain_dp(problem, order, single=False, limit=None)
            if found is not None and found[0] < best_score[0]:
                best, best_score, improved = found[1], (found[0], 0.0), True
        if not improved:
            break
    if best is chain:
        return chain
    polished = resplit(problem, best.nodes)
    return best if polished is None else polished


def _moves(problem: Problem, nodes: list[int], worst: int, count: int) -> list[list[int]]:
    unused = np.ones(problem.size, dtype=bool)
    unused[nodes] = False
    spare = np.flatnonzero(unused)
    spare = spare[np.lexsort((-problem.capacity[spare], problem.per_byte_batch[spare]))][:count]
    grow = len(nodes) < min(problem.max_stages, problem.layers)
    orders = []
    for v in spare.tolist():
        orders.append([*nodes[:worst], v, *nodes[worst + 1 :]])
        if grow:
            orders.append([*nodes[:worst], v, *nodes[worst:]])
            orders.append([*nodes[: worst + 1], v, *nodes[worst + 1 :]])
    return [o for o in orders if problem.first_ok[o[0]] and problem.last_ok[o[-1]]]


def _strong_subsets(problem: Problem, size: int) -> list[list[int]]:
    """Small node sets worth an exact search: the fastest, and the roomiest, nodes."""
    per_byte = (
        problem.per_byte_batch
        if problem.workload.objective == "throughput"
        else problem.per_byte_single
    )
    fastest = np.lexsort((-problem.capacity, per_byte))
    roomiest = np.lexsort((per_byte, -problem.capacity))
    subsets = []
    for ranking in (fastest, roomiest):
        chosen = [int(i) for i in ranking[:size]]
        for need in (problem.first_ok, problem.last_ok):
            if not need[chosen].any():
                extra = [int(i) for i in ranking if need[i]][:1]
                chosen = chosen[: size - 1] + extra
        subsets.append(sorted(set(chosen)))
    return [s for i, s in enumerate(subsets) if s not in subsets[:i]]


def _bisect_bottleneck(problem: Problem, settings: SearchSettings) -> list[Chain]:
    """Chains from the greedy builder: the roomiest (no time limit) and the fastest found."""
    loose = _greedy(problem, INF)
    if loose is None:
        return []
    found = [loose]
    low = bottleneck_lower_bound(problem)
    high = problem.evaluate(loose).bottleneck_seconds
    for _ in range(settings.bisection_steps):
        if high <= low * (1 + settings.bisection_tolerance):
            break
        middle = math.sqrt(low * high) if low > 0 else high / 2
        chain = _greedy(problem, middle)
        if chain is None:
            low = middle
            continue
        found.append(chain)
        high = min(middle, problem.evaluate(chain).bottleneck_seconds)
    return found if len(found) == 1 else [found[0], found[-1]]


def _greedy(problem: Problem, limit: float) -> Chain | None:
    """Build a chain whose every stage and edge costs <= limit at batch S, or None.

    Each step takes the unused node that covers the most further layers; as soon as a
    node may finish the chain (last-stage rule, return edge within limit) it does.
    """
    batch, end = problem.workload.max_sequences, problem.layers
    used = np.zeros(problem.size, dtype=bool)
    nodes: list[int] = []
    bounds = [0]
    while len(nodes) < problem.max_stages:
        start = bounds[-1]
        open_ = ~used & (problem.first_ok if not nodes else True)
        if nodes:
            open_ &= problem.forward_row(nodes[-1], batch=batch, with_hop=False) <= limit
        partial, full = _reach(problem, start, limit)
        finish = open_ & full & problem.last_ok
        if nodes:  # the return edge to stage 0 must stay within the limit too
            finish &= problem.return_row(nodes[0], batch=batch, with_hop=False) <= limit
        if finish.any():
            candidates = np.flatnonzero(finish)
            nodes.append(int(candidates[np.argmin(problem.per_byte_batch[candidates])]))
            bounds.append(end)
            return Chain(nodes=tuple(nodes), bounds=tuple(bounds))
        reach = np.where(open_, partial, start)
        order = np.lexsort((problem.per_byte_batch, -reach))
        pick = int(order[0])
        if reach[pick] <= start:
            return None
        used[pick] = True
        nodes.append(pick)
        bounds.append(int(reach[pick]))
    return None


def _reach(problem: Problem, start: int, limit: float) -> tuple[npt.NDArray[np.int64], BoolArray]:
    """Per node: the furthest layer c < L a stage from `start` can reach within limit
    (start if none), and whether it could hold [start, L) with the head."""
    end = problem.layers
    weights = problem.ends[start + 1 : end + 1] - problem.starts[start]
    spans = np.arange(1, end - start + 1, dtype=np.float64)
    memory = problem.mem_ends[start + 1 : end + 1] - problem.mem_starts[start]
    every = np.arange(problem.size)
    within = (problem.batch_rates.stage(every, weights[None, :], spans[None, :]) <= limit) & (
        memory[None, :] <= problem.capacity[:, None]
    )
    partial = start + within[:, :-1].sum(axis=1)
    return partial, within[:, -1]


# lower bounds -----------------------------------------------------------------------
#
# Either the whole model runs as one stage (its cost is known exactly), or there are at
# least two stages: then stage 0 holds the embeddings + layer 0 on a node allowed to be
# first, the last stage the head + the last layer on a node allowed to be last, every
# byte is processed by some node no faster than the fastest, and there is at least one
# forward edge and one return edge. Relaxing everything else gives a valid bound.


def lower_bound(problem: Problem) -> float:
    """No chain over these nodes has a better objective than this."""
    if problem.workload.objective == "throughput":
        return bottleneck_lower_bound(problem)
    return latency_lower_bound(problem)


def bottleneck_lower_bound(problem: Problem) -> float:
    alone = _single_stage_cost(problem, problem.batch_rates)
    if not _may_have_several(problem):
        return alone
    return min(alone, _bottleneck_several(problem))


def latency_lower_bound(problem: Problem) -> float:
    alone = _single_stage_cost(problem, problem.single_rates)
    if not _may_have_several(problem):
        return alone
    return min(alone, _latency_several(problem))


def _may_have_several(problem: Problem) -> bool:
    return problem.max_stages >= 2 and problem.size >= 2 and problem.layers >= 2


def _single_stage_cost(problem: Problem, rates: Rates) -> float:
    whole = problem.memory(0, problem.layers)
    alone = (problem.capacity >= whole) & problem.first_ok & problem.last_ok
    if not alone.any():
        return INF
    whole_weights = problem.weight(0, problem.layers)
    costs = rates.per_byte * whole_weights + rates.per_layer * problem.layers + rates.per_stage
    return float(costs[alone].min())


def _end_costs(problem: Problem, per_byte: FloatArray) -> tuple[float, float]:
    """Least compute of stage 0 (embeddings + layer 0) and of the last stage."""
    end = problem.layers
    first = (
        problem.weight(0, 1)
        * per_byte[problem.first_ok & (problem.capacity >= problem.memory(0, 1))]
    )
    last = (
        problem.weight(end - 1, end)
        * per_byte[problem.last_ok & (problem.capacity >= problem.memory(end - 1, end))]
    )
    return float(first.min(initial=INF)), float(last.min(initial=INF))


def _bottleneck_several(problem: Problem) -> float:
    total = float(problem.weight(0, problem.layers))
    limit = min(problem.size, problem.max_stages, problem.layers)
    rate = 1 / problem.per_byte_batch
    room = np.maximum(problem.capacity, 0.0)

    def holds(t: float) -> bool:
        can = np.sort(np.minimum(rate * t, room))[::-1]
        return float(can[:limit].sum()) >= total

    low, high = 0.0, float(total * problem.per_byte_batch.max())
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (low, middle) if holds(middle) else (middle, high)
    first, last = _end_costs(problem, problem.per_byte_batch)
    mbps = _max_mbps(problem) * 1e6
    batch = problem.workload.max_sequences
    act = 8 * batch * problem.profile.hidden_size * problem.profile.activation_bytes / mbps
    back = 8 * batch * profiles.TOKEN_ID_BYTES / mbps
    largest = float(max(problem.profile.layer_bytes)) * float(problem.per_byte_batch.min())
    return max(low, first, last, act, back, largest)


def _latency_several(problem: Problem) -> float:
    first, last = _end_costs(problem, problem.per_byte_single)
    end = problem.layers
    remaining = float(problem.weight(1, end - 1)) if end > 2 else 0.0
    middle = 0.0
    for i in np.argsort(problem.per_byte_single):
        take = min(remaining, max(float(problem.capacity[i]), 0.0))
        middle += take * float(problem.per_byte_single[i])
        remaining -= take
        if remaining <= 0:
            break
    # stage 0's node sends the first forward edge and receives the return edge
    forward = back = INF
    for u in np.flatnonzero(problem.first_ok).tolist():
        others = np.arange(problem.size) != u
        forward = min(forward, float(problem.forward_row(u, batch=1, with_hop=True)[others].min()))
        back = min(back, float(problem.return_row(u, batch=1, with_hop=True)[others].min()))
    return first + middle + last + forward + back


def _max_mbps(problem: Problem) -> float:
    uplinks = np.sort(problem.uplink)
    best = float(uplinks[-2]) if problem.size > 1 else float(uplinks[-1])
    links = [mbps for rows in problem.overrides.values() for _, mbps, _ in rows]
    return max([best, *links])
