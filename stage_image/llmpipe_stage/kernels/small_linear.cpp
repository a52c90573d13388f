// llmpipe's decode-step product: y[M, N] = x[M, K] . W[N, K]^T (* scale[n]) (+ bias[n]) for
// a few activation rows (M = 1..8), bound by reading W once at memory bandwidth.
//
// W stays in its plain row-major layout: each output row's weights are contiguous, so the
// inner loop streams R rows side by side (R = 4 for M <= 4, else 2) and every weight vector
// loaded is used for all M activation rows before the next one is read. The M activation
// rows (a few KB) stay in L1. Threads split the output rows (at::parallel_for, torch's own
// thread pool and count). Sums are float32; the output takes x's dtype.
//
//   bf16 x, bf16 W:   vdpbf16ps (AVX512_BF16), 32 weights per instruction.
//   bf16/f32 x, int8 W (one scale per row): int8 widened to float32, FMA, scale at the end.
//   f32 x, f32 W:     FMA, 16 weights per instruction.
//
// Compiled by llmpipe_stage.kernels (cached by content hash); built with -mavx512f
// -mavx512bw -mavx512vl -mavx512bf16, loaded only where the CPU reports those flags.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <omp.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <optional>
#include <vector>
#include <cstdint>
#include <cstring>

namespace {

#ifndef LLMPIPE_PREFETCH
#define LLMPIPE_PREFETCH 1024
#endif
constexpr int64_t kPrefetch = LLMPIPE_PREFETCH;  // bytes ahead of the current position in each row
#ifndef LLMPIPE_ROWS
#define LLMPIPE_ROWS 4
#endif
constexpr int kRowsFew = LLMPIPE_ROWS;  // output rows streamed side by side for M <= 4

inline void prefetch(const void* p) {
  if constexpr (kPrefetch > 0)
    _mm_prefetch(static_cast<const char*>(p) + kPrefetch, _MM_HINT_T0);
}

inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

inline __m512bh as_bh(__m512i v) {
  __m512bh r;
  std::memcpy(&r, &v, sizeof(r));
  return r;
}

// out[m * R + r] = sum_k x[m, k] * w[r, k] for bf16 x and w.
template <int M, int R>
inline void block_bf16(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t K,
                       float* out) {
  __m512 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) {
      const uint16_t* p = w + r * K + k;
      prefetch(p);
      wv[r] = as_bh(_mm512_loadu_si512(p));
    }
    for (int m = 0; m < M; ++m) {
      __m512bh xv = as_bh(_mm512_loadu_si512(x + m * ldx + k));
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);
    }
  }
  if (k < K) {
    const __mmask32 mask = static_cast<__mmask32>((uint64_t{1} << (K - k)) - 1);
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) wv[r] = as_bh(_mm512_maskz_loadu_epi16(mask, w + r * K + k));
    for (int m = 0; m < M; ++m) {
      __m512bh xv = as_bh(_mm512_maskz_loadu_epi16(mask, x + m * ldx + k));
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) out[m * R + r] = hsum(acc[m][r]);
}

// out[m * R + r] = sum_k x[m, k] * w[r, k] for float32 x and w.
template <int M, int R>
inline void block_f32(const float* x, int64_t ldx, const float* w, int64_t K, float* out) {
  __m512 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[R];
    for (int r = 0; r < R; ++r) {
      const float* p = w + r * K + k;
      prefetch(p);
      wv[r] = _mm512_loadu_ps(p);
    }
    for (int m = 0; m < M; ++m) {
      __m512 xv = _mm512_loadu_ps(x + m * ldx + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  if (k < K) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1);
    __m512 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm512_maskz_loadu_ps(mask, w + r * K + k);
    for (int m = 0; m < M; ++m) {
      __m512 xv = _mm512_maskz_loadu_ps(mask, x + m * ldx + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) out[m * R + r] = hsum(acc[m][r]);
}

// out[m * R + r] = sum_k x[m, k] * w[r, k] for float32 x and int8 w (unscaled).
template <int M, int R>
inline void block_i8(const float* x, int64_t ldx, const int8_t* w, int64_t K, float* out) {
  __m512 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[R];
    for (int r = 0; r < R; ++r) {
      const int8_t* p = w + r * K + k;
      if ((k & 63) == 0) prefetch(p);
      __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      wv[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
    }
    for (int m = 0; m < M; ++m) {
      __m512 xv = _mm512_loadu_ps(x + m * ldx + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  if (k < K) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1);
    __m512 wv[R];
    for (int r = 0; r < R; ++r) {
      __m128i b = _mm_maskz_loadu_epi8(mask, w + r * K + k);
      wv[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
    }
    for (int m = 0; m < M; ++m) {
      __m512 xv = _mm512_maskz_loadu_ps(mask, x + m * ldx + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) out[m * R + r] = hsum(acc[m][r]);
}

enum class Kind { kBf16, kF32, kInt8 };

struct Args {
  const void* x;  // [M, K]: bf16 for kBf16, float32 otherwise (int8 converts bf16 x first)
  const void* w;  // [N, K]
  int64_t M, N, K;
  const float* scale;  // [N] or null
  const float* bias;   // [N] or null
  void* y;             // [M, N], bf16 or float32
  bool y_bf16;
  bool y_round = false;  // float32 y holding bf16-rounded values (decode_layer's buffers)
};

template <int M, int R>
inline void rows_block(const Args& a, Kind kind, int64_t n, float* sums) {
  switch (kind) {
    case Kind::kBf16:
      block_bf16<M, R>(static_cast<const uint16_t*>(a.x), a.K,
                       static_cast<const uint16_t*>(a.w) + n * a.K, a.K, sums);
      break;
    case Kind::kF32:
      block_f32<M, R>(static_cast<const float*>(a.x), a.K,
                      static_cast<const float*>(a.w) + n * a.K, a.K, sums);
      break;
    case Kind::kInt8:
      block_i8<M, R>(static_cast<const float*>(a.x), a.K,
                     static_cast<const int8_t*>(a.w) + n * a.K, a.K, sums);
      break;
  }
}

template <int M, int R>
inline void store(const Args& a, int64_t n, int rows, const float* sums) {
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < rows; ++r) {
      float v = sums[m * R + r];
      if (a.scale) v *= a.scale[n + r];
      if (a.bias) v += a.bias[n + r];
      int64_t at = m * a.N + n + r;
      if (a.y_bf16)
        static_cast<c10::BFloat16*>(a.y)[at] = c10::BFloat16(v);
      else
        static_cast<float*>(a.y)[at] = a.y_round ? static_cast<float>(c10::BFloat16(v)) : v;
    }
}

template <int M>
constexpr int block_rows() {
  return M <= 4 ? kRowsFew : 2;
}

// Output rows [b0 * R, b1 * R) of the product (R = block_rows<M>()).
template <int M>
void run_blocks(const Args& a, Kind kind, int64_t b0, int64_t b1) {
  constexpr int R = block_rows<M>();
  float sums[M * R];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n = b * R;
    if (n + R <= a.N) {
      rows_block<M, R>(a, kind, n, sums);
      store<M, R>(a, n, R, sums);
    } else {
      for (int64_t i = n; i < a.N; ++i) {
        float one[M];
        rows_block<M, 1>(a, kind, i, one);
        store<M, 1>(a, i, 1, one);
      }
    }
  }
}

template <int M>
void run(const Args& a, Kind kind) {
  constexpr int R = block_rows<M>();
  const int64_t blocks = (a.N + R - 1) / R;
  // At least ~64 KB of weights per task, so small products do not pay for waking threads.
  const int64_t row_bytes = a.K * (kind == Kind::kInt8 ? 1 : kind == Kind::kBf16 ? 2 : 4);
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / std::max<int64_t>(1, row_bytes * R));
  auto body = [&](int64_t b0, int64_t b1) { run_blocks<M>(a, kind, b0, b1); };
  // Under 1 MB of weights a second thread costs more to wake than it saves.
  if (a.N * row_bytes < (int64_t{1} << 20))
    body(0, blocks);
  else
    at::parallel_for(0, blocks, grain, body);
}

// Thread `tid` of `nt`'s contiguous share of the product (inside a parallel region).
template <int M>
void run_share(const Args& a, Kind kind, int tid, int nt) {
  constexpr int R = block_rows<M>();
  const int64_t blocks = (a.N + R - 1) / R, chunk = (blocks + nt - 1) / nt;
  run_blocks<M>(a, kind, std::min(blocks, tid * chunk), std::min(blocks, (tid + 1) * chunk));
}

void dispatch_share(const Args& a, Kind kind, int tid, int nt) {
  switch (a.M) {
    case 1: return run_share<1>(a, kind, tid, nt);
    case 2: return run_share<2>(a, kind, tid, nt);
    case 3: return run_share<3>(a, kind, tid, nt);
    case 4: return run_share<4>(a, kind, tid, nt);
    case 5: return run_share<5>(a, kind, tid, nt);
    case 6: return run_share<6>(a, kind, tid, nt);
    case 7: return run_share<7>(a, kind, tid, nt);
    default: return run_share<8>(a, kind, tid, nt);
  }
}

void dispatch(const Args& a, Kind kind) {
  switch (a.M) {
    case 1: return run<1>(a, kind);
    case 2: return run<2>(a, kind);
    case 3: return run<3>(a, kind);
    case 4: return run<4>(a, kind);
    case 5: return run<5>(a, kind);
    case 6: return run<6>(a, kind);
    case 7: return run<7>(a, kind);
    case 8: return run<8>(a, kind);
    default: TORCH_CHECK(false, "small_linear: 1 to 8 rows, got ", a.M);
  }
}

// y = x W^T (* scales) (+ bias); x [M, K] (M <= 8), W [N, K] contiguous: bf16 x with bf16 W,
// float32 x with float32 W, or bf16/float32 x with int8 W and scales [N].
at::Tensor small_linear(const at::Tensor& x_in, const at::Tensor& w,
                        const std::optional<at::Tensor>& scales,
                        const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x_in.dim() == 2 && w.dim() == 2, "small_linear: x [M, K] and w [N, K]");
  TORCH_CHECK(x_in.device().is_cpu() && w.device().is_cpu(), "small_linear: CPU tensors");
  TORCH_CHECK(w.is_contiguous(), "small_linear: w must be contiguous");
  const int64_t M = x_in.size(0), K = x_in.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K, "small_linear: x has ", K, " columns, w ", w.size(1));
  TORCH_CHECK(M >= 1 && M <= 8, "small_linear: 1 to 8 rows, got ", M);
  const auto xt = x_in.scalar_type();
  TORCH_CHECK(xt == at::kBFloat16 || xt == at::kFloat, "small_linear: x bf16 or float32");
  Kind kind;
  at::Tensor x = x_in.contiguous();
  if (w.scalar_type() == at::kChar) {
    TORCH_CHECK(scales.has_value(), "small_linear: int8 weights need scales");
    kind = Kind::kInt8;
    x = x.to(at::kFloat);
  } else {
    TORCH_CHECK(w.scalar_type() == xt, "small_linear: w and x dtypes differ");
    TORCH_CHECK(!scales.has_value(), "small_linear: scales only with int8 weights");
    kind = xt == at::kBFloat16 ? Kind::kBf16 : Kind::kF32;
  }
  at::Tensor s, b;
  if (scales.has_value()) {
    TORCH_CHECK(scales->numel() == N, "small_linear: one scale per output row");
    s = scales->to(at::kFloat).contiguous();
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == N, "small_linear: one bias per output row");
    b = bias->to(at::kFloat).contiguous();
  }
  at::Tensor y = at::empty({M, N}, x_in.options());
  Args a{x.data_ptr(), w.data_ptr(), M, N, K,
         s.defined() ? s.data_ptr<float>() : nullptr,
         b.defined() ? b.data_ptr<float>() : nullptr,
         y.data_ptr(), xt == at::kBFloat16};
  dispatch(a, kind);
  return y;
}


// ---- One decoder layer's decode step (decode_layer) -------------------------------------------
//
// The whole layer of a Llama-style model (llama, mistral, qwen2: RMSNorm, rotate-half rotary,
// grouped-query attention, SiLU-gated MLP) for M <= 8 new tokens, one per sequence, in one
// call: the products run through the kernels above, everything between them (norms, rotary,
// the cache write, attention over each sequence's cached positions, SiLU * up, residuals)
// runs here on a few KB of activations instead of as ~30 torch ops. Each intermediate is
// rounded to the activation dtype where transformers' layer rounds it (after every torch op
// of a bf16 model), so the arithmetic follows the layer's own; only summation orders differ.

inline float rnd(float v, bool bf16) { return bf16 ? static_cast<float>(c10::BFloat16(v)) : v; }

// A [M, K] activation buffer in the form a product of `kind` reads.
struct Activations {
  Kind kind;
  int64_t K;
  std::vector<float> f;      // kF32 / kInt8 (bf16-rounded values when the dtype is bf16)
  std::vector<uint16_t> b;   // kBf16
  Activations(Kind k, int64_t M, int64_t cols) : kind(k), K(cols) {
    if (k == Kind::kBf16) b.resize(M * cols); else f.resize(M * cols);
  }
  void set(int64_t m, int64_t k, float v) {  // v already rounded to the dtype
    if (kind == Kind::kBf16) {
      c10::BFloat16 h(v);
      b[m * K + k] = h.x;
    } else {
      f[m * K + k] = v;
    }
  }
  const void* data() const { return kind == Kind::kBf16 ? static_cast<const void*>(b.data())
                                                        : static_cast<const void*>(f.data()); }
};

struct Weight {
  const at::Tensor& w;
  const std::optional<at::Tensor>& scales;
  const std::optional<at::Tensor>& bias;
};

Kind kind_of(const at::Tensor& w, bool bf16) {
  if (w.scalar_type() == at::kChar) return Kind::kInt8;
  return bf16 ? Kind::kBf16 : Kind::kF32;
}

// A product inside decode_layer: checked before any thread starts, then computed in shares.
struct Product {
  Args args;
  Kind kind;
  std::vector<float> y;  // [M, N] float32, rounded to the dtype
};

Product prepare(const Activations& x, int64_t M, const Weight& wt, bool bf16) {
  const at::Tensor& w = wt.w;
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) == x.K,
              "decode_layer: a weight is not [N, ", x.K, "] contiguous");
  const int64_t N = w.size(0);
  TORCH_CHECK(kind_of(w, bf16) == x.kind, "decode_layer: weight dtypes differ");
  if (x.kind == Kind::kInt8)
    TORCH_CHECK(wt.scales.has_value() && wt.scales->scalar_type() == at::kFloat &&
                wt.scales->numel() == N, "decode_layer: int8 weights need float32 scales [N]");
  if (wt.bias.has_value())
    TORCH_CHECK(wt.bias->scalar_type() == at::kFloat && wt.bias->numel() == N,
                "decode_layer: bias must be float32 [N]");
  Product p{Args{x.data(), w.data_ptr(), M, N, x.K,
                 wt.scales.has_value() ? wt.scales->data_ptr<float>() : nullptr,
                 wt.bias.has_value() ? wt.bias->data_ptr<float>() : nullptr, nullptr, false,
                 bf16},
            x.kind, std::vector<float>(M * N)};
  p.args.y = p.y.data();
  return p;
}

// A barrier for the few threads of one decode_layer call: they spin (the phases between
// two barriers last microseconds) and yield the core after a while, so a thread that is
// waiting for a preempted one gives it the CPU back instead of burning it.
class SpinBarrier {
 public:
  explicit SpinBarrier(int n) : n_(n) {}
  void set_size(int n) { n_.store(n, std::memory_order_relaxed); }  // the team's, all alike
  void wait() {
    const int gen = gen_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_.load(std::memory_order_relaxed)) {
      count_.store(0, std::memory_order_relaxed);
      gen_.fetch_add(1, std::memory_order_release);
      return;
    }
    for (int spins = 0; gen_.load(std::memory_order_acquire) == gen; ++spins) {
      if (spins < 2000)
        _mm_pause();
      else
        sched_yield();
    }
  }

 private:
  std::atomic<int> n_;
  std::atomic<int> count_{0};
  std::atomic<int> gen_{0};
};

// transformers' LlamaRMSNorm: w * (x * rsqrt(mean(x^2) + eps)).to(dtype), float32 inside.
void rms_norm(const float* x, int64_t M, int64_t K, const float* wp, double eps, bool bf16,
              Activations& out) {
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * K;
    float sq = 0.f;
    for (int64_t k = 0; k < K; ++k) sq += row[k] * row[k];
    const float inv = 1.0f / std::sqrt(sq / static_cast<float>(K) + static_cast<float>(eps));
    for (int64_t k = 0; k < K; ++k) out.set(m, k, rnd(wp[k] * rnd(row[k] * inv, bf16), bf16));
  }
}

// Attention of one query head over positions [0, length) of one slot's cache.
void attend(const float* q, const float* keys, const float* values, int64_t length,
            int64_t D, float scaling, float* scores, float* out) {
  float top = -INFINITY;
  for (int64_t t = 0; t < length; ++t) {
    const float* k = keys + t * D;
    float s = 0.f;
    for (int64_t d = 0; d < D; ++d) s += q[d] * k[d];
    scores[t] = s * scaling;
    top = std::max(top, scores[t]);
  }
  float total = 0.f;
  for (int64_t t = 0; t < length; ++t) total += (scores[t] = std::exp(scores[t] - top));
  for (int64_t d = 0; d < D; ++d) out[d] = 0.f;
  for (int64_t t = 0; t < length; ++t) {
    const float p = scores[t] / total;
    const float* v = values + t * D;
    for (int64_t d = 0; d < D; ++d) out[d] += p * v[d];
  }
}

// One layer's decode step: x [M, hidden] (bf16 or float32) -> x after the layer; writes the
// new keys and values at [layer, slots[m], :, positions[m]] of the pool's keys and values
// ([layers, slots, kv_heads, context, head_dim], the activation dtype); attention reads
// positions [0, positions[m]] of each row's slot. cos, sin: [M, head_dim].
//
// Everything is checked and allocated first; then the layer runs as one parallel region
// (torch's thread count): the products and attention split across the threads, the small
// steps between them on thread 0, a spin barrier after each. So a layer wakes the second
// thread once, not once per product.
at::Tensor decode_layer(const at::Tensor& x_in, const at::Tensor& norm1, double eps1,
                        const at::Tensor& qkv_w, const std::optional<at::Tensor>& qkv_s,
                        const std::optional<at::Tensor>& qkv_b, const at::Tensor& o_w,
                        const std::optional<at::Tensor>& o_s,
                        const std::optional<at::Tensor>& o_b, const at::Tensor& norm2,
                        double eps2, const at::Tensor& gu_w,
                        const std::optional<at::Tensor>& gu_s,
                        const std::optional<at::Tensor>& gu_b, const at::Tensor& d_w,
                        const std::optional<at::Tensor>& d_s,
                        const std::optional<at::Tensor>& d_b, at::Tensor keys,
                        at::Tensor values, int64_t layer, const at::Tensor& slots,
                        const at::Tensor& positions, const at::Tensor& cos,
                        const at::Tensor& sin, int64_t heads, int64_t kv_heads,
                        int64_t D, double scaling) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.is_cpu(), "decode_layer: x [M, hidden] on the CPU");
  const int64_t M = x_in.size(0), H = x_in.size(1);
  TORCH_CHECK(M >= 1 && M <= 8, "decode_layer: 1 to 8 rows, got ", M);
  const auto dt = x_in.scalar_type();
  TORCH_CHECK(dt == at::kBFloat16 || dt == at::kFloat, "decode_layer: x bf16 or float32");
  const bool bf16 = dt == at::kBFloat16;
  TORCH_CHECK(heads % kv_heads == 0 && D % 2 == 0 && D <= 512,
              "decode_layer: heads, kv heads, head dim (even, at most 512)");
  TORCH_CHECK(keys.dim() == 5 && keys.is_contiguous() && values.is_contiguous() &&
              keys.sizes() == values.sizes() && keys.scalar_type() == dt &&
              values.scalar_type() == dt && keys.size(2) == kv_heads && keys.size(4) == D,
              "decode_layer: pool [layers, slots, kv_heads, context, head_dim] in x's dtype");
  TORCH_CHECK(slots.numel() == M && positions.numel() == M && cos.size(0) == M &&
              sin.size(0) == M && cos.size(-1) == D && sin.size(-1) == D,
              "decode_layer: one slot, position, cos and sin row per x row");
  TORCH_CHECK(norm1.numel() == H && norm2.numel() == H, "decode_layer: norm weights [hidden]");
  const int64_t S = keys.size(1), C = keys.size(3);
  const auto slot = slots.to(at::kLong).contiguous();
  const auto pos = positions.to(at::kLong).contiguous();
  const int64_t* sp = slot.data_ptr<int64_t>();
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m)
    TORCH_CHECK(sp[m] >= 0 && sp[m] < S && pp[m] >= 0 && pp[m] < C,
                "decode_layer: slot or position outside the pool");
  TORCH_CHECK(layer >= 0 && layer < keys.size(0), "decode_layer: layer outside the pool");
  const int64_t width = (heads + 2 * kv_heads) * D;
  TORCH_CHECK(qkv_w.dim() == 2 && qkv_w.size(0) == width, "decode_layer: q|k|v rows");
  TORCH_CHECK(o_w.dim() == 2 && o_w.size(0) == H && d_w.dim() == 2 && d_w.size(0) == H,
              "decode_layer: o_proj and down_proj rows");
  TORCH_CHECK(gu_w.dim() == 2 && gu_w.size(0) % 2 == 0, "decode_layer: gate|up rows");
  const int64_t I = gu_w.size(0) / 2;
  const auto cf = cos.to(at::kFloat).contiguous(), sf = sin.to(at::kFloat).contiguous();
  const float* cp = cf.data_ptr<float>();
  const float* snp = sf.data_ptr<float>();
  const auto n1 = norm1.to(at::kFloat).contiguous(), n2 = norm2.to(at::kFloat).contiguous();
  const auto xf = x_in.to(at::kFloat).contiguous();
  std::vector<float> x(xf.data_ptr<float>(), xf.data_ptr<float>() + M * H);
  const int64_t group = heads / kv_heads, half = D / 2;

  Activations h1(kind_of(qkv_w, bf16), M, H), attn(kind_of(o_w, bf16), M, heads * D);
  Activations h2(kind_of(gu_w, bf16), M, H), act(kind_of(d_w, bf16), M, I);
  Product qkv = prepare(h1, M, {qkv_w, qkv_s, qkv_b}, bf16);
  Product o = prepare(attn, M, {o_w, o_s, o_b}, bf16);
  Product gu = prepare(h2, M, {gu_w, gu_s, gu_b}, bf16);
  Product d = prepare(act, M, {d_w, d_s, d_b}, bf16);
  TORCH_CHECK(o.args.K == heads * D && d.args.K == I, "decode_layer: o_proj / down_proj width");
  c10::BFloat16* kb = bf16 ? keys.data_ptr<c10::BFloat16>() : nullptr;
  c10::BFloat16* vb = bf16 ? values.data_ptr<c10::BFloat16>() : nullptr;
  float* kfp = bf16 ? nullptr : keys.data_ptr<float>();
  float* vfp = bf16 ? nullptr : values.data_ptr<float>();
  const int64_t slot_stride = kv_heads * C * D, layer_stride = S * slot_stride;
  auto cache_at = [&](int64_t m, int64_t g) {
    return layer * layer_stride + sp[m] * slot_stride + g * C * D;
  };
  float* q = qkv.y.data();

  // thread 0: rotary on q and k (x * cos + rotate_half(x) * sin, rounded after each op),
  // then the new keys and values into the pool
  auto rotary_and_write = [&]() {
    float rotated[512];
    for (int64_t m = 0; m < M; ++m)
      for (int64_t h = 0; h < heads + kv_heads; ++h) {
        float* v = q + m * width + h * D;
        for (int64_t i = 0; i < D; ++i) {
          const float r = i < half ? -v[i + half] : v[i - half];
          rotated[i] = rnd(rnd(v[i] * cp[m * D + i], bf16) + rnd(r * snp[m * D + i], bf16), bf16);
        }
        std::memcpy(v, rotated, D * sizeof(float));
      }
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < kv_heads; ++g) {
        const float* k = q + m * width + (heads + g) * D;
        const float* v = q + m * width + (heads + kv_heads + g) * D;
        const int64_t at = cache_at(m, g) + pp[m] * D;
        for (int64_t i = 0; i < D; ++i) {
          if (bf16) {
            kb[at + i] = c10::BFloat16(k[i]);
            vb[at + i] = c10::BFloat16(v[i]);
          } else {
            kfp[at + i] = k[i];
            vfp[at + i] = v[i];
          }
        }
      }
  };
  // attention of items [begin, end) (item = row m, kv head g: that kv head's query heads)
  auto attend_items = [&](int64_t begin, int64_t end) {
    std::vector<float> kf, vf, scores, out(D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t m = item / kv_heads, g = item % kv_heads, length = pp[m] + 1;
      kf.resize(length * D);
      vf.resize(length * D);
      scores.resize(length);
      const int64_t base = cache_at(m, g);
      for (int64_t j = 0; j < length * D; ++j) {
        kf[j] = bf16 ? static_cast<float>(kb[base + j]) : kfp[base + j];
        vf[j] = bf16 ? static_cast<float>(vb[base + j]) : vfp[base + j];
      }
      for (int64_t j = 0; j < group; ++j) {
        const int64_t head = g * group + j;
        attend(q + m * width + head * D, kf.data(), vf.data(), length, D,
               static_cast<float>(scaling), scores.data(), out.data());
        for (int64_t i = 0; i < D; ++i) attn.set(m, head * D + i, rnd(out[i], bf16));
      }
    }
  };
  auto residual_and_norm = [&]() {
    for (int64_t i = 0; i < M * H; ++i) x[i] = rnd(x[i] + o.y[i], bf16);
    rms_norm(x.data(), M, H, n2.data_ptr<float>(), eps2, bf16, h2);
  };
  auto silu_times_up = [&]() {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t i = 0; i < I; ++i) {
        const float g = gu.y[m * 2 * I + i], u = gu.y[m * 2 * I + I + i];
        act.set(m, i, rnd(rnd(g / (1.0f + std::exp(-g)), bf16) * u, bf16));
      }
  };
  const int64_t items = M * kv_heads;
  auto steps = [&](int tid, int nt, auto&& sync) {
    if (tid == 0) rms_norm(x.data(), M, H, n1.data_ptr<float>(), eps1, bf16, h1);
    sync();
    dispatch_share(qkv.args, qkv.kind, tid, nt);
    sync();
    if (tid == 0) rotary_and_write();
    sync();
    const int64_t chunk = (items + nt - 1) / nt;
    attend_items(std::min(items, tid * chunk), std::min(items, (tid + 1) * chunk));
    sync();
    dispatch_share(o.args, o.kind, tid, nt);
    sync();
    if (tid == 0) residual_and_norm();
    sync();
    dispatch_share(gu.args, gu.kind, tid, nt);
    sync();
    if (tid == 0) silu_times_up();
    sync();
    dispatch_share(d.args, d.kind, tid, nt);
  };
  const int threads = at::get_num_threads();
  if (threads <= 1 || at::in_parallel_region()) {
    steps(0, 1, [] {});
  } else {
    SpinBarrier barrier(threads);
#pragma omp parallel num_threads(threads)
    {
      const int team = omp_get_num_threads();  // the same in every thread of the team
      barrier.set_size(team);
      steps(omp_get_thread_num(), team, [&] { barrier.wait(); });
    }
  }
  at::Tensor y = at::empty({M, H}, x_in.options());
  for (int64_t i = 0; i < M * H; ++i) {
    const float v = x[i] + d.y[i];
    if (bf16)
      y.data_ptr<c10::BFloat16>()[i] = c10::BFloat16(v);
    else
      y.data_ptr<float>()[i] = v;
  }
  return y;
}

// Reads every byte of t (vector loads, threads over contiguous halves) and returns a float
// that depends on all of it: the streaming-read bandwidth that bench/kernel.py compares with.
double stream_read(const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous() && t.is_cpu(), "stream_read: a contiguous CPU tensor");
  const char* p = static_cast<const char*>(t.data_ptr());
  const int64_t chunks = t.numel() * t.element_size() / 256;
  std::atomic<int64_t> total{0};
  at::parallel_for(0, chunks, 4096, [&](int64_t b, int64_t e) {
    __m512i acc0 = _mm512_setzero_si512(), acc1 = _mm512_setzero_si512();
    __m512i acc2 = _mm512_setzero_si512(), acc3 = _mm512_setzero_si512();
    for (int64_t c = b; c < e; ++c) {
      const char* q = p + c * 256;
      acc0 = _mm512_xor_si512(acc0, _mm512_loadu_si512(q));
      acc1 = _mm512_xor_si512(acc1, _mm512_loadu_si512(q + 64));
      acc2 = _mm512_xor_si512(acc2, _mm512_loadu_si512(q + 128));
      acc3 = _mm512_xor_si512(acc3, _mm512_loadu_si512(q + 192));
    }
    __m512i all = _mm512_xor_si512(_mm512_xor_si512(acc0, acc1), _mm512_xor_si512(acc2, acc3));
    total += _mm512_reduce_add_epi64(all);
  });
  return static_cast<double>(total.load());
}

}  // namespace

TORCH_LIBRARY(llmpipe, m) {
  m.def("small_linear(Tensor x, Tensor w, Tensor? scales, Tensor? bias) -> Tensor");
  m.def(
      "decode_layer(Tensor x, Tensor norm1, float eps1, Tensor qkv, Tensor? qkv_scales, "
      "Tensor? qkv_bias, Tensor out, Tensor? out_scales, Tensor? out_bias, Tensor norm2, "
      "float eps2, Tensor gate_up, Tensor? gate_up_scales, Tensor? gate_up_bias, Tensor down, "
      "Tensor? down_scales, Tensor? down_bias, Tensor(a!) keys, Tensor(b!) values, int layer, "
      "Tensor slots, Tensor positions, Tensor cos, Tensor sin, int heads, int kv_heads, "
      "int head_dim, float scaling) -> Tensor");
  m.def("stream_read(Tensor t) -> float");
}

TORCH_LIBRARY_IMPL(llmpipe, CPU, m) {
  m.impl("small_linear", &small_linear);
  m.impl("decode_layer", &decode_layer);
  m.impl("stream_read", &stream_read);
}
