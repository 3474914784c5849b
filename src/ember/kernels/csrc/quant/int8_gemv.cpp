// Weight-only int8 with one scale per output channel, for a few tokens (decode): y[m, n] =
// scale[n] * sum_k x[m, k] * code[n, k] in float32, rounded once to bfloat16. The scale multiplies the
// sum instead of each weight, so the codes are only widened. Each thread walks its band of weight rows
// one row at a time (a plain sequential read, as bf16_gemv.cpp), two accumulators per token along K.
// 30 SmolLM2 layers from memory on a Zen 4, 2 threads: 6.5-6.9 ms; four interleaved rows with software
// prefetch 16 rows ahead took 11.2 (that walk had measured 5.7-6.1 against 10.8 for
// torch._weight_int8pack_mm on a Xeon).
//
// W8A8 (dynamic per-token int8 activations) has its own GEMV here: exact int32 sums of activation
// codes times weight codes with AVX512-VNNI (`vpdpbusd`, unsigned x signed bytes: the activation codes
// come shifted by 128, and 128 * the column sum of the weight codes is taken back off), the same
// integers `torch._int_mm` gives, to be rescaled by `rescale_rows`.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "gemv.h"
#include "quant_api.h"

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define EMBER_GEMV_AVX512 1
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define EMBER_GEMV_VNNI 1
#endif

namespace {

using ember_gemv::kMaxTokens;

#ifdef EMBER_GEMV_AVX512
inline __m512 widen16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// Rows [n0, n1) of the weight against M float32 activation rows; K % 32 == 0.
template <int M>
void row_band(const int8_t* w, const float* x, const float* scale, at::BFloat16* y, int64_t n, int64_t k,
              int64_t n0, int64_t n1) {
  for (int64_t r = n0; r < n1; ++r) {
    const int8_t* row = w + r * k;
    __m512 acc0[M], acc1[M];
    for (int m = 0; m < M; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; i += 32) {
      const __m512 w0 = widen16(row + i), w1 = widen16(row + i + 16);
      for (int m = 0; m < M; ++m) {
        acc0[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * k + i), acc0[m]);
        acc1[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + m * k + i + 16), acc1[m]);
      }
    }
    for (int m = 0; m < M; ++m)
      y[m * n + r] = static_cast<at::BFloat16>(_mm512_reduce_add_ps(_mm512_add_ps(acc0[m], acc1[m])) * scale[r]);
  }
}
#endif

#ifdef EMBER_GEMV_VNNI
// Rows [n0, n1): acc[m, r] = sum_k (x[m, k] - 128) * w[r, k], x uint8 (codes + 128), any K.
template <int M>
void vnni_band(const uint8_t* x, const int8_t* w, const int32_t* colsum, int32_t* acc, int64_t n, int64_t k,
               int64_t n0, int64_t n1) {
  const __mmask64 tail = k % 64 ? (~0ULL >> (64 - k % 64)) : ~0ULL;
  for (int64_t r = n0; r < n1; ++r) {
    const int8_t* row = w + r * k;
    __m512i sum[M];
    for (int m = 0; m < M; ++m) sum[m] = _mm512_setzero_si512();
    for (int64_t i = 0; i < k; i += 64) {
      const __mmask64 mask = i + 64 <= k ? ~0ULL : tail;
      const __m512i wv = _mm512_maskz_loadu_epi8(mask, row + i);
      for (int m = 0; m < M; ++m)
        sum[m] = _mm512_dpbusd_epi32(sum[m], _mm512_maskz_loadu_epi8(mask, x + m * k + i), wv);
    }
    for (int m = 0; m < M; ++m) acc[m * n + r] = _mm512_reduce_add_epi32(sum[m]) - 128 * colsum[r];
  }
}
#endif

// x bf16 [M <= 4, K]; codes int8 [N, K]; scale float32 [N]. Needs K % 32 == 0.
torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor codes, torch::Tensor scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16 && x.size(0) <= kMaxTokens,
              "x must be bfloat16 [M <= 4, K]");
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == torch::kInt8 && codes.size(1) == x.size(1),
              "codes must be int8 [N, K]");
  const int64_t m = x.size(0), n = codes.size(0), k = codes.size(1);
  TORCH_CHECK(k % 32 == 0, "needs in_features % 32 == 0");
  TORCH_CHECK(scale.numel() == n && scale.scalar_type() == torch::kFloat32, "scale must be float32 [N]");
  auto y = torch::empty({m, n}, x.options());
#ifdef EMBER_GEMV_AVX512
  if (m == 0) return y;
  const auto xf = x.to(torch::kFloat32).contiguous();
  codes = codes.contiguous();
  scale = scale.contiguous();
  const int8_t* w = codes.data_ptr<int8_t>();
  const float* xp = xf.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  ember_gemv::for_row_bands(m, n, [&](auto tokens, int64_t begin, int64_t end) {
    row_band<decltype(tokens)::value>(w, xp, sp, yp, n, k, begin, end);
  });
#else
  TORCH_CHECK(false, "built without AVX-512");
#endif
  return y;
}

}  // namespace

// x_codes uint8 [M <= 4, K] (per-token codes + 128); codes int8 [N, K]; colsum int32 [N] (sum_k codes).
// Returns the exact int32 products [M, N] of the signed activation codes with the weight codes.
torch::Tensor w8a8_gemv_acc(torch::Tensor x_codes, torch::Tensor codes, torch::Tensor colsum) {
  TORCH_CHECK(x_codes.dim() == 2 && x_codes.scalar_type() == torch::kUInt8 && x_codes.size(0) <= kMaxTokens,
              "x_codes must be uint8 [M <= 4, K]");
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == torch::kInt8 && codes.size(1) == x_codes.size(1),
              "codes must be int8 [N, K]");
  const int64_t m = x_codes.size(0), n = codes.size(0), k = codes.size(1);
  TORCH_CHECK(colsum.numel() == n && colsum.scalar_type() == torch::kInt32, "colsum must be int32 [N]");
  auto acc = torch::empty({m, n}, torch::dtype(torch::kInt32));
#ifdef EMBER_GEMV_VNNI
  if (m == 0) return acc;
  x_codes = x_codes.contiguous();
  codes = codes.contiguous();
  colsum = colsum.contiguous();
  const uint8_t* xp = x_codes.data_ptr<uint8_t>();
  const int8_t* w = codes.data_ptr<int8_t>();
  const int32_t* cs = colsum.data_ptr<int32_t>();
  int32_t* ap = acc.data_ptr<int32_t>();
  ember_gemv::for_row_bands(m, n, [&](auto tokens, int64_t begin, int64_t end) {
    vnni_band<decltype(tokens)::value>(xp, w, cs, ap, n, k, begin, end);
  });
#else
  TORCH_CHECK(false, "built without AVX512-VNNI");
#endif
  return acc;
}

void register_gemv(pybind11::module& m) {
  ember_quant_api::table().int8_gemv = &int8_gemv;
  m.def("int8_gemv", &int8_gemv, "bf16 x [<= 4, K] @ (int8 codes [N, K] * scale[N])^T, scale applied to the sum");
  m.def("w8a8_gemv_acc", &w8a8_gemv_acc, "exact int32 products of per-token activation codes (+128, uint8) and int8 codes");
}
