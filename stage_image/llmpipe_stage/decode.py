"""The decode step's hot path: fused projections, weight-only int8, one batched step.

A decode step (one new token per sequence, many sequences) is bound by reading the weights
once, so it should cost little more than its matrix products. transformers' decoder layer
spends a large share of a CPU decode step in small ops (three q/k/v products, two
gate/up products, rotary twice, a cache object per call). `fuse_layer` concatenates
q|k|v and gate|up into one weight each and points the layer's own projections at row
views of it (no second copy), so the layer still runs prompts exactly as transformers does;
`decode_layers` runs a decode batch over those fused weights with one attention call per
layer, rotary applied once to q|k, and keys and values written in place into the stage's
`SlotPool`. The arithmetic is the layer's own (same norms, same rotary formula, same
attention), so greedy tokens equal transformers'.

Weight-only int8 (`quantize="int8"`): every projection weight becomes int8 with one scale
per output row (symmetric, max |w| / 127) and runs through `aten._weight_int8pack_mm`
(activations bf16): half the bytes of bf16 per token.

bfloat16 weights on a CPU are packed once at load into oneDNN's blocked layout
(`PackedProjection`): torch's plain `linear` reads a bf16 weight at about 10-12 GB/s per
core on the benchmark CPU, the packed product at 15-21 GB/s (docs/benchmarks.md, "Decode
speed"), for one token and for a few. The prompt path (transformers' layers) calls q, k
and v one after another on the same input; over a packed q|k|v the first call computes the
fused product and the others take their columns of it (`SharedRows`), so no weight is held
twice and a prompt still costs one product per fused weight.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional

from llmpipe_stage import kernels

if TYPE_CHECKING:
    from llmpipe_stage.runtime import SlotPool


class Projection(nn.Module):
    """y = x W^T + b for a float weight, or int8 weight with per-row scales.

    With `small=True` (llmpipe's own kernel is loaded and takes this dtype, see
    `kernels`), products of up to `kernels.MAX_ROWS` rows (a decode step) run through
    `kernels.small_linear`; longer inputs (prompts) keep torch's product."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        scales: torch.Tensor | None = None,
        *,
        small: bool = False,
    ) -> None:
        super().__init__()
        self.weight = weight  # [out, in]: float, or int8 when scales is set
        self.bias = bias
        self.scales = scales  # [out], the activation dtype
        self.small = small and weight.is_contiguous()
        # The kernel's epilogue reads float32 scales and bias (a few KB per projection).
        self.small_scales = None if scales is None or not self.small else scales.float()
        self.small_bias = None if bias is None or not self.small else bias.float()

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.small and flat.shape[0] <= kernels.MAX_ROWS:
            small = kernels.small_linear(flat, self.weight, self.small_scales, self.small_bias)
            return small.reshape(*x.shape[:-1], small.shape[-1])
        if self.scales is None:
            return functional.linear(x, self.weight, self.bias)
        y: torch.Tensor = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def rows(self, start: int, end: int) -> Projection:
        """A projection over rows [start, end) of this one's weight (views, no copy)."""
        bias = None if self.bias is None else self.bias[start:end]
        scales = None if self.scales is None else self.scales[start:end]
        return Projection(self.weight[start:end], bias, scales, small=self.small)

    def nbytes(self) -> int:
        parts = (self.weight, self.bias, self.scales)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


class PackedProjection(Projection):
    """y = x W^T + b with W in oneDNN's packed layout (CPU, bfloat16 or float16)."""

    def __init__(self, plain: Projection, *, batch_hint: int) -> None:
        weight = plain.weight
        super().__init__(
            torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint), plain.bias, None
        )
        self.shape = (int(weight.shape[0]), int(weight.shape[1]))
        self.views = 0
        self.memo: tuple[torch.Tensor, torch.Tensor, set[tuple[int, int]]] | None = None

    @property
    def out_features(self) -> int:
        return self.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
            x, self.weight, self.bias, "none", [], ""
        )
        return y

    def rows(self, start: int, end: int) -> SharedRows:  # type: ignore[override]
        self.views += 1
        return SharedRows(self, start, end)

    def columns_of(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Output columns [start, end) for input x, computing the product once per input
        while the row views take their parts in turn."""
        memo = self.memo
        if memo is None or memo[0] is not x or (start, end) in memo[2]:
            memo = self.memo = (x, self(x), set())
        memo[2].add((start, end))
        if len(memo[2]) >= self.views:
            self.memo = None  # every view took its part: hold no activations
        return memo[1][..., start:end]

    def nbytes(self) -> int:
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.shape[0] * self.shape[1] * self.weight.element_size() + bias


class SharedRows(nn.Module):
    """Rows [start, end) of a packed projection, as transformers' layer calls them."""

    def __init__(self, parent: PackedProjection, start: int, end: int) -> None:
        super().__init__()
        self.parent = [parent]  # a list: not registered as a submodule (no second owner)
        self.start, self.end = start, end

    @property
    def out_features(self) -> int:
        return self.end - self.start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.parent[0].columns_of(x, self.start, self.end)


def packable(weight: torch.Tensor) -> bool:
    """Whether `weight` goes through oneDNN's packed product: a 16-bit float on a CPU whose
    oneDNN build takes it (checked by packing a tiny weight once)."""
    if weight.device.type != "cpu" or weight.dtype not in (torch.bfloat16, torch.float16):
        return False
    if weight.dtype not in _PACKABLE:
        try:
            probe = torch.ops.mkldnn._reorder_linear_weight(
                torch.zeros(8, 8, dtype=weight.dtype), 1
            )
            torch.ops.mkldnn._linear_pointwise(
                torch.zeros(1, 8, dtype=weight.dtype), probe, None, "none", [], ""
            )
            _PACKABLE[weight.dtype] = True
        except (RuntimeError, AttributeError):
            _PACKABLE[weight.dtype] = False
    return _PACKABLE[weight.dtype]


_PACKABLE: dict[torch.dtype, bool] = {}


def quantize_int8(
    weight: torch.Tensor, *, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (int8 [out, in], scales [out]) with w ~= q * scale.

    Rows are independent, so they are converted QUANTIZE_BLOCK_BYTES of float32 at a
    time: the float32 temporaries stay a few MB, not several copies of the whole matrix
    (for a vocabulary head that was the load's peak)."""
    rows, columns = weight.shape
    q = torch.empty((rows, columns), dtype=torch.int8, device=weight.device)
    scales = torch.empty(rows, dtype=torch.float32, device=weight.device)
    step = max(1, QUANTIZE_BLOCK_BYTES // (4 * max(1, columns)))
    for start in range(0, rows, step):
        w = weight[start : start + step].float()
        block = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        scales[start : start + step] = block
        q[start : start + step] = torch.round(w / block[:, None]).clamp(-127, 127)
    return q, scales.to(scale_dtype)


QUANTIZE_BLOCK_BYTES = 4 * 2**20


def projection(
    weights: list[torch.Tensor],
    biases: list[torch.Tensor | None],
    *,
    quantize: str,
    dtype: torch.dtype,
    pack_for: int = 0,
) -> Projection:
    """One projection over the concatenated rows of `weights` (freed as they are joined).

    The inputs are detached first: the loaded weights are Parameters, and autograd would
    otherwise keep every intermediate of the int8 conversion (a float32 copy of each
    weight) alive through the scales' graph, tripling an int8 stage's memory."""
    weights = [w.detach() for w in weights]
    biases = [None if b is None else b.detach() for b in biases]
    weight = weights[0] if len(weights) == 1 else torch.cat(weights)
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat(
            [
                b if b is not None else w.new_zeros(w.shape[0])
                for w, b in zip(weights, biases, strict=True)
            ]
        )
    small = small_kernel(weight, quantize=quantize, dtype=dtype)
    if quantize == "int8":
        q, scales = quantize_int8(weight, scale_dtype=dtype)
        return Projection(q, None if bias is None else bias.to(dtype), scales, small=small)
    if small:  # the kernel reads the plain layout: no packed copy
        return Projection(weight.contiguous(), bias, small=True)
    plain = Projection(weight, bias)
    if pack_for and packable(weight):
        return PackedProjection(plain, batch_hint=pack_for)
    return plain


def small_kernel(weight: torch.Tensor, *, quantize: str, dtype: torch.dtype) -> bool:
    """Whether decode-sized products of this weight run through llmpipe's kernel: a CPU
    weight in bfloat16 or float32 (or int8 of either), where the kernel is loaded."""
    if weight.device.type != "cpu" or dtype not in (torch.bfloat16, torch.float32):
        return False
    if quantize not in ("none", "int8") or (quantize == "none" and weight.dtype != dtype):
        return False
    return kernels.available()


@dataclass
class FusedLayer:
    """One decoder layer's weights as the decode step reads them."""

    qkv: Projection  # rows: q (heads * head_dim) | k | v (kv_heads * head_dim each)
    out: Projection
    gate_up: Projection  # rows: gate (intermediate) | up (intermediate)
    down: Projection
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float
    input_norm: nn.Module
    post_norm: nn.Module
    act: Callable[[torch.Tensor], torch.Tensor]
    native: bool = False
    """Whether decode runs this layer through `kernels.decode_layer` (`native_layer`)."""


class Fuser:
    """Fuses each decoder layer as the loader builds it (`loading.build_slice(on_layer=)`),
    so a quantized stage holds one layer's float weights at a time while loading."""

    def __init__(self, *, quantize: str, pack_for: int = 0) -> None:
        self.quantize = quantize
        self.pack_for = pack_for
        self.layers: list[FusedLayer] = []

    def __call__(self, layer: nn.Module) -> None:
        attn: Any = layer.self_attn
        config = attn.config
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        self.layers.append(
            fuse_layer(
                layer,
                heads=heads,
                kv_heads=kv_heads,
                quantize=self.quantize,
                pack_for=self.pack_for,
            )
        )


def fuse_layer(
    layer: Any, *, heads: int, kv_heads: int, quantize: str, pack_for: int = 0
) -> FusedLayer:
    """Fuse q|k|v and gate|up, quantize when asked (or pack 16-bit weights for oneDNN when
    `pack_for`, the usual decode batch, is set), and re-point the layer's own projection
    modules at row views of the fused weights (prompts keep running through the layer)."""
    attn, mlp = layer.self_attn, layer.mlp
    dtype = attn.q_proj.weight.dtype
    head_dim = int(attn.head_dim)
    parts = [attn.q_proj, attn.k_proj, attn.v_proj]
    make = functools.partial(projection, quantize=quantize, dtype=dtype, pack_for=pack_for)
    qkv = make([p.weight for p in parts], [p.bias for p in parts])
    gate_up = make(
        [mlp.gate_proj.weight, mlp.up_proj.weight], [mlp.gate_proj.bias, mlp.up_proj.bias]
    )
    out = make([attn.o_proj.weight], [attn.o_proj.bias])
    down = make([mlp.down_proj.weight], [mlp.down_proj.bias])
    q_rows, kv_rows = heads * head_dim, kv_heads * head_dim
    attn.q_proj = qkv.rows(0, q_rows)
    attn.k_proj = qkv.rows(q_rows, q_rows + kv_rows)
    attn.v_proj = qkv.rows(q_rows + kv_rows, q_rows + 2 * kv_rows)
    attn.o_proj = out
    intermediate = gate_up.out_features // 2
    mlp.gate_proj = gate_up.rows(0, intermediate)
    mlp.up_proj = gate_up.rows(intermediate, 2 * intermediate)
    mlp.down_proj = down
    fused = FusedLayer(
        qkv=qkv,
        out=out,
        gate_up=gate_up,
        down=down,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        scaling=float(attn.scaling),
        input_norm=layer.input_layernorm,
        post_norm=layer.post_attention_layernorm,
        act=mlp.act_fn,
    )
    fused.native = native_layer(fused)
    return fused


RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"})
"""Norm classes whose arithmetic `kernels.decode_layer` reproduces: w * (x * rsqrt(mean(x^2)
+ eps)).to(dtype) (Gemma's 1 + w, for one, is not among them)."""


def native_layer(layer: FusedLayer) -> bool:
    """Whether this layer's decode step can run as one `kernels.decode_layer` call: every
    projection takes llmpipe's kernel in its plain layout, the norms are the RMSNorm above,
    the activation is SiLU, and `LLMPIPE_DECODE_LAYER` is not `off` (to compare with the
    op-by-op step, which stays the path for everything else)."""
    if os.environ.get("LLMPIPE_DECODE_LAYER", "") == "off":
        return False
    projections = (layer.qkv, layer.out, layer.gate_up, layer.down)
    if not all(type(p) is Projection and p.small for p in projections):
        return False
    norms = (layer.input_norm, layer.post_norm)
    if not all(type(n).__name__ in RMS_NORMS for n in norms):
        return False
    silu = isinstance(layer.act, nn.SiLU) or type(layer.act).__name__ == "SiLUActivation"
    return silu and layer.head_dim <= kernels.MAX_HEAD_DIM


def native_step(
    layer: FusedLayer,
    index: int,
    x: torch.Tensor,
    *,
    pool: SlotPool,
    slots: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> torch.Tensor:
    """x [batch, hidden] -> the layer's output, through `kernels.decode_layer` (which also
    writes the new keys and values at (slot, position) of layer `index` in the pool)."""
    norm1: Any = layer.input_norm
    norm2: Any = layer.post_norm
    return kernels.decode_layer(
        x,
        (norm1.weight, float(norm1.variance_epsilon)),
        [(p.weight, p.small_scales, p.small_bias) for p in (layer.qkv, layer.out)],
        (norm2.weight, float(norm2.variance_epsilon)),
        [(p.weight, p.small_scales, p.small_bias) for p in (layer.gate_up, layer.down)],
        pool=(pool.keys, pool.values, index),
        slots=slots,
        positions=positions,
        rotary=(cos, sin),
        heads=(layer.heads, layer.kv_heads, layer.head_dim),
        scaling=layer.scaling,
    )


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """transformers' rotate_half: [x1, x2] -> [-x2, x1] on the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def decode_layers(
    layers: list[FusedLayer],
    hidden: torch.Tensor,
    *,
    pool: SlotPool,
    slots: list[int],
    past: list[int],
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> torch.Tensor:
    """One decode step over the slice: hidden [batch, hidden_size] at positions `past`
    (each sequence's cached length) -> [batch, hidden_size]; writes each layer's new keys
    and values at (slot, past) in `pool`. cos, sin: [batch, head_dim] for those positions.
    Layers that `native_layer` accepts run as one `kernels.decode_layer` call each."""
    batch = hidden.shape[0]
    length = max(past) + 1
    pool.readable(slots, length)
    slot_index = torch.tensor(slots, device=hidden.device)
    position_index = torch.tensor(past, device=hidden.device)
    x = hidden
    if batch <= kernels.MAX_ROWS and all(layer.native for layer in layers):
        for index, layer in enumerate(layers):
            x = native_step(
                layer,
                index,
                x,
                pool=pool,
                slots=slot_index,
                positions=position_index,
                cos=cos,
                sin=sin,
            )
        for slot, position in zip(slots, past, strict=True):
            pool.wrote(slot, position + 1)
        return x
    mask = None
    if len(set(past)) > 1:  # unequal lengths: hide each sequence's keys past its own
        visible = torch.arange(length, device=hidden.device)[None, :] <= position_index[:, None]
        mask = visible[:, None, None, :]  # [batch, 1, 1, length]: kv heads, query rows
    cos, sin = cos[:, None, :], sin[:, None, :]  # [batch, 1, head_dim]: over heads
    for index, layer in enumerate(layers):
        heads, kv_heads, head_dim = layer.heads, layer.kv_heads, layer.head_dim
        qkv = layer.qkv(layer.input_norm(x))  # [batch, (heads + 2 kv_heads) * head_dim]
        qk = qkv[:, : (heads + kv_heads) * head_dim].view(batch, heads + kv_heads, head_dim)
        value = qkv[:, (heads + kv_heads) * head_dim :].view(batch, kv_heads, head_dim)
        qk = qk * cos + rotate_half(qk) * sin
        pool.keys[index, slot_index, :, position_index] = qk[:, heads:]
        pool.values[index, slot_index, :, position_index] = value
        keys, values = pool.read(index, slots, length)  # [batch, kv_heads, length, head_dim]
        # Grouped-query attention without repeating keys: the heads sharing a kv head are
        # that kv head's query rows.
        query = qk[:, :heads].reshape(batch, kv_heads, heads // kv_heads, head_dim)
        attended = functional.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask, scale=layer.scaling
        )
        x = x + layer.out(attended.reshape(batch, heads * head_dim))
        gate_up = layer.gate_up(layer.post_norm(x))
        gate, up = gate_up.chunk(2, dim=-1)
        x = x + layer.down(layer.act(gate) * up)
    for slot, position in zip(slots, past, strict=True):
        pool.wrote(slot, position + 1)
    return x
