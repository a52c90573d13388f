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

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t kPrefetch = 1024;  // bytes ahead of the current position in each row

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
      _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetch, _MM_HINT_T0);
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
      _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetch, _MM_HINT_T0);
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
      if ((k & 63) == 0)
        _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetch, _MM_HINT_T0);
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
        static_cast<float*>(a.y)[at] = v;
    }
}

template <int M>
void run(const Args& a, Kind kind) {
  constexpr int R = M <= 4 ? 4 : 2;
  const int64_t blocks = (a.N + R - 1) / R;
  // At least ~64 KB of weights per task, so small products do not pay for waking threads.
  const int64_t row_bytes = a.K * (kind == Kind::kInt8 ? 1 : kind == Kind::kBf16 ? 2 : 4);
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / std::max<int64_t>(1, row_bytes * R));
  auto body = [&](int64_t b0, int64_t b1) {
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
  };
  // Under 1 MB of weights a second thread costs more to wake than it saves.
  if (a.N * row_bytes < (int64_t{1} << 20))
    body(0, blocks);
  else
    at::parallel_for(0, blocks, grain, body);
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

}  // namespace

TORCH_LIBRARY(llmpipe, m) {
  m.def("small_linear(Tensor x, Tensor w, Tensor? scales, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmpipe, CPU, m) { m.impl("small_linear", &small_linear); }
