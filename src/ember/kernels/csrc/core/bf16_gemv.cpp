// bfloat16 linear for a few tokens (decode): y[m, n] = sum_k x[m, k] * w[n, k] in float32, rounded once
// to bfloat16, straight from the row-major weight. A decode step streams every weight once, so the
// kernel is a plain sequential read: each thread walks its band of rows one row at a time, with two
// accumulators per token along K. `vdpbf16ps` multiplies bf16 pairs exactly and sums them in float32,
// so nothing is widened. Measured on a Zen 4 with 2 threads: 25-30 GB/s, the speed of a plain read of
// the same bytes; four interleaved rows with software prefetch gave 15-18.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <vector>

#include "gemv.h"

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define EMBER_BF16_GEMV_AVX512 1
#endif

namespace {

using ember_gemv::kMaxTokens;

#ifdef EMBER_BF16_GEMV_AVX512
inline __m512bh load_bf16x32(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }

// Rows [n0, n1) of the weight against M activation rows; K % 32 == 0. With Accumulate, each sum is added to
// y's value in float32 and rounded once.
template <int M, bool Accumulate = false>
void row_band(const uint16_t* w, const uint16_t* x, at::BFloat16* y, int64_t n, int64_t k, int64_t n0,
              int64_t n1) {
  for (int64_t r = n0; r < n1; ++r) {
    const uint16_t* row = w + r * k;
    __m512 acc0[M], acc1[M];
    for (int m = 0; m < M; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 64 <= k; i += 64) {  // two 64-byte lines of the row
      const __m512bh w0 = load_bf16x32(row + i), w1 = load_bf16x32(row + i + 32);
      for (int m = 0; m < M; ++m) {
        acc0[m] = _mm512_dpbf16_ps(acc0[m], w0, load_bf16x32(x + m * k + i));
        acc1[m] = _mm512_dpbf16_ps(acc1[m], w1, load_bf16x32(x + m * k + i + 32));
      }
    }
    if (i < k) {  // K % 64 == 32
      const __m512bh w0 = load_bf16x32(row + i);
      for (int m = 0; m < M; ++m) acc0[m] = _mm512_dpbf16_ps(acc0[m], w0, load_bf16x32(x + m * k + i));
    }
    for (int m = 0; m < M; ++m) {
      const float sum = _mm512_reduce_add_ps(_mm512_add_ps(acc0[m], acc1[m]));
      y[m * n + r] = static_cast<at::BFloat16>(Accumulate ? static_cast<float>(y[m * n + r]) + sum : sum);
    }
  }
}
#endif

}  // namespace

// x bf16 [M <= 4, K]; weight bf16 [N, K]. Needs K % 32 == 0.
torch::Tensor bf16_gemv(torch::Tensor x, torch::Tensor weight) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16 && x.size(0) <= kMaxTokens,
              "x must be bfloat16 [M <= 4, K]");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kBFloat16 && weight.size(1) == x.size(1),
              "weight must be bfloat16 [N, K]");
  const int64_t m = x.size(0), n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(k % 32 == 0, "needs in_features % 32 == 0");
  auto y = torch::empty({m, n}, x.options());
#ifdef EMBER_BF16_GEMV_AVX512
  if (m == 0) return y;
  x = x.contiguous();
  weight = weight.contiguous();
  const auto* w = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  ember_gemv::for_row_bands(m, n, [&](auto tokens, int64_t begin, int64_t end) {
    row_band<decltype(tokens)::value>(w, xp, yp, n, k, begin, end);
  });
#else
  TORCH_CHECK(false, "built without AVX512-BF16");
#endif
  return y;
}

// out bf16 [M <= 4, N] += x[:, index] @ weight^T in place, each sum added in float32 and rounded once: the
// input channels a quantized linear keeps in float (QuantLinear), gathered here instead of copied out first.
// x bf16 [M, K]; index int64 [C]; weight bf16 [N, C]. Needs C % 32 == 0.
torch::Tensor bf16_gemv_channels_(torch::Tensor out, torch::Tensor x, torch::Tensor index, torch::Tensor weight) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16 && x.size(0) <= kMaxTokens,
              "x must be bfloat16 [M <= 4, K]");
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == torch::kLong, "index must be int64 [C]");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kBFloat16 && weight.size(1) == index.size(0),
              "weight must be bfloat16 [N, C]");
  TORCH_CHECK(out.dim() == 2 && out.scalar_type() == torch::kBFloat16 && out.is_contiguous() &&
                  out.size(0) == x.size(0) && out.size(1) == weight.size(0),
              "out must be contiguous bfloat16 [M, N]");
  const int64_t m = x.size(0), n = weight.size(0), c = weight.size(1), k = x.size(1);
  TORCH_CHECK(c % 32 == 0, "needs a multiple of 32 channels");
#ifdef EMBER_BF16_GEMV_AVX512
  if (m == 0) return out;
  x = x.contiguous();
  index = index.contiguous();
  weight = weight.contiguous();
  const int64_t* idx = index.data_ptr<int64_t>();
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  std::vector<uint16_t> picked(m * c);
  for (int64_t j = 0; j < c; ++j) {
    TORCH_CHECK(idx[j] >= 0 && idx[j] < k, "channel index ", idx[j], " out of range for ", k, " input features");
    for (int64_t r = 0; r < m; ++r) picked[r * c + j] = xp[r * k + idx[j]];
  }
  const auto* w = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  at::BFloat16* yp = out.data_ptr<at::BFloat16>();
  ember_gemv::for_row_bands(m, n, [&](auto tokens, int64_t begin, int64_t end) {
    row_band<decltype(tokens)::value, true>(w, picked.data(), yp, n, c, begin, end);
  });
#else
  TORCH_CHECK(false, "built without AVX512-BF16");
#endif
  return out;
}

void register_bf16_gemv(pybind11::module& m) {
  m.def("bf16_gemv", &bf16_gemv, "bf16 x [<= 4, K] @ bf16 weight [N, K]^T, float32 sums rounded once");
  m.def("bf16_gemv_channels_", &bf16_gemv_channels_,
        "out [<= 4, N] += x[:, index] @ weight [N, C]^T in place, bf16, each sum added in float32 and rounded once");
}
