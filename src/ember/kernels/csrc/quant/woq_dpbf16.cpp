// Weight-only linears for calls of more rows than a GEMV takes, on AVX512-BF16 without AMX: a call turns
// each panel of 32 output channels into bfloat16 pairs of k ([K/2][16] 32-bit words per 16 channels) in a
// per-thread buffer, and every block of up to 12 rows multiplies the panel with `vdpbf16ps` (the products
// of two bfloat16 values are exact in float32), 12 x 2 float32 accumulators rounded once to bfloat16.
// - int8, one scale per channel: the codes are widened as they are (bfloat16 holds every code exactly)
//   and the scale multiplies the float32 sum: int8_gemv.cpp's arithmetic, summed in another order.
// - int4, a scale and an offset per group: the codes are dequantized as dequantize_bf16 does (code *
//   scale + offset, rounded to bfloat16), so a call computes what dequant_dense's matmul computes.
// The codes are kept in panel order by pairs of k (ember.kernels.linear.weight_only repacks them once,
// same size); scales and offsets per group as [N / 16, G, 16].
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "quant_api.h"

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define EMBER_DPBF16 1
#endif

namespace {

#ifdef EMBER_DPBF16
constexpr int64_t kBlockN = 16;  // channels per accumulator vector
constexpr int kMaxRows = 12;     // rows per micro-kernel call: 12 x 2 accumulators, 2 weight vectors, 1 broadcast

// One 16-channel block's int8 codes [K/2][16][2] -> bfloat16 pairs [K/2][16] (word c: k even low, k odd high).
void widen_block_int8(const int8_t* codes, int64_t pairs, uint32_t* out) {
  for (int64_t p = 0; p < pairs; ++p) {
    const int8_t* src = codes + 32 * p;
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16))));
    _mm512_storeu_si512(out + kBlockN * p, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  }
}

// One 16-channel block's 4-bit codes [K/2][16] (byte c: k even in the low nibble, k odd in the high one),
// dequantized with the group's scale and offset ([G][16]) -> bfloat16 pairs [K/2][16].
void dequant_block_int4(const uint8_t* codes, const float* scales, const float* offsets, int64_t pairs,
                        int64_t group_pairs, uint32_t* out) {
  const __m128i nibble = _mm_set1_epi8(0x0F);
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t g = p / group_pairs;
    const __m512 scale = _mm512_loadu_ps(scales + g * kBlockN), offset = _mm512_loadu_ps(offsets + g * kBlockN);
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + kBlockN * p));
    const __m512 even = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(raw, nibble)));
    const __m512 odd = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), nibble)));
    const __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(_mm512_mul_ps(even, scale), offset)));
    const __m512i hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(_mm512_mul_ps(odd, scale), offset)));
    _mm512_storeu_si512(out + kBlockN * p, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
  }
}

// MR rows of x (bfloat16 pairs, `pairs` words a row) against NB blocks of the panel; the accumulators are
// multiplied by the channels' `scale` when given.
template <int MR, int NB>
void micro(const uint32_t* panel, int64_t pairs, const uint32_t* x, const float* scale, at::BFloat16* y,
           int64_t n) {
  __m512 acc[MR][NB];
  for (int m = 0; m < MR; ++m)
    for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh w[NB];
    for (int b = 0; b < NB; ++b) w[b] = (__m512bh)_mm512_loadu_si512(panel + b * pairs * kBlockN + kBlockN * p);
    for (int m = 0; m < MR; ++m) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[m * pairs + p]));
      for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_dpbf16_ps(acc[m][b], w[b], xv);
    }
  }
  for (int b = 0; b < NB; ++b) {
    const __m512 s = scale ? _mm512_loadu_ps(scale + b * kBlockN) : _mm512_set1_ps(1.f);
    for (int m = 0; m < MR; ++m) {
      const __m512 out = scale ? _mm512_mul_ps(acc[m][b], s) : acc[m][b];
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + m * n + b * kBlockN), (__m256i)_mm512_cvtneps_pbh(out));
    }
  }
}

// micro<rows, NB> for rows = 1..MR.
template <int NB, int MR = kMaxRows>
void rows_block(int rows, const uint32_t* panel, int64_t pairs, const uint32_t* x, const float* scale,
                at::BFloat16* y, int64_t n) {
  if constexpr (MR > 1) {
    if (rows < MR) return rows_block<NB, MR - 1>(rows, panel, pairs, x, scale, y, n);
  }
  micro<MR, NB>(panel, pairs, x, scale, y, n);
}

// y [M, N] = x [M, K] against every panel: fill(block, out) writes a 16-channel block's pairs; `scale`
// (per channel, or null) multiplies the sums.
template <typename Fill>
void run_panels(const torch::Tensor& x, int64_t n, const float* scale, torch::Tensor& y, Fill fill) {
  const int64_t m = x.size(0), pairs = x.size(1) / 2;
  const auto* xp = reinterpret_cast<const uint32_t*>(x.data_ptr<at::BFloat16>());
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  const int64_t blocks = n / kBlockN, panels = (blocks + 1) / 2;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> panel(2 * pairs * kBlockN);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t nb = 2 * i, count = std::min<int64_t>(2, blocks - nb);
      for (int64_t b = 0; b < count; ++b) fill(nb + b, panel.data() + b * pairs * kBlockN);
      const float* panel_scale = scale ? scale + nb * kBlockN : nullptr;
      for (int64_t m0 = 0; m0 < m; m0 += kMaxRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kMaxRows, m - m0));
        at::BFloat16* dst = yp + m0 * n + nb * kBlockN;
        if (count == 2) rows_block<2>(rows, panel.data(), pairs, xp + m0 * pairs, panel_scale, dst, n);
        else rows_block<1>(rows, panel.data(), pairs, xp + m0 * pairs, panel_scale, dst, n);
      }
    }
  });
}
#endif

}  // namespace

// x bf16 [M, K]; codes int8 [N / 16, K / 2, 16, 2] (by pairs of k); scale float32 [N]. Returns y bf16 [M, N].
torch::Tensor int8_linear_dpbf16(torch::Tensor x, torch::Tensor codes, torch::Tensor scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16, "x must be bfloat16 [M, K]");
  TORCH_CHECK(codes.dim() == 4 && codes.scalar_type() == torch::kInt8 && codes.size(2) == 16 && codes.size(3) == 2 &&
                  codes.size(1) * 2 == x.size(1),
              "codes must be int8 [N / 16, K / 2, 16, 2]");
  const int64_t m = x.size(0), n = codes.size(0) * 16, pairs = x.size(1) / 2;
  TORCH_CHECK(scale.numel() == n && scale.scalar_type() == torch::kFloat32, "scale must be float32 [N]");
  auto y = torch::empty({m, n}, x.options());
#ifdef EMBER_DPBF16
  if (m == 0) return y;
  x = x.contiguous();
  codes = codes.contiguous();
  scale = scale.contiguous();
  const int8_t* cp = codes.data_ptr<int8_t>();
  run_panels(x, n, scale.data_ptr<float>(), y,
             [&](int64_t block, uint32_t* out) { widen_block_int8(cp + block * pairs * 32, pairs, out); });
#else
  TORCH_CHECK(false, "built without AVX512-BF16");
#endif
  return y;
}

// x bf16 [M, K]; codes uint8 [N / 16, K / 2, 16] (byte: k even low nibble, k odd high); scales, offsets
// float32 [N / 16, G, 16] with G = K / group_len. Returns y bf16 [M, N].
torch::Tensor int4_linear_dpbf16(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, torch::Tensor offsets,
                                 int64_t group_len) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16, "x must be bfloat16 [M, K]");
  TORCH_CHECK(codes.dim() == 3 && codes.scalar_type() == torch::kUInt8 && codes.size(2) == 16 &&
                  codes.size(1) * 2 == x.size(1),
              "codes must be uint8 [N / 16, K / 2, 16]");
  const int64_t m = x.size(0), k = x.size(1), n = codes.size(0) * 16, pairs = k / 2;
  TORCH_CHECK(group_len % 2 == 0 && k % group_len == 0, "the group length must be even and divide K");
  const int64_t groups = k / group_len;
  for (const auto& t : {scales, offsets})
    TORCH_CHECK(t.dim() == 3 && t.size(0) == n / 16 && t.size(1) == groups && t.size(2) == 16 &&
                    t.scalar_type() == torch::kFloat32,
                "scales and offsets must be float32 [N / 16, G, 16]");
  auto y = torch::empty({m, n}, x.options());
#ifdef EMBER_DPBF16
  if (m == 0) return y;
  x = x.contiguous();
  codes = codes.contiguous();
  scales = scales.contiguous();
  offsets = offsets.contiguous();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* op = offsets.data_ptr<float>();
  run_panels(x, n, nullptr, y, [&](int64_t block, uint32_t* out) {
    dequant_block_int4(cp + block * pairs * 16, sp + block * groups * 16, op + block * groups * 16, pairs,
                       group_len / 2, out);
  });
#else
  TORCH_CHECK(false, "built without AVX512-BF16");
#endif
  return y;
}

void register_woq_dpbf16(pybind11::module& m) {
  ember_quant_api::table().int8_linear_dpbf16 = &int8_linear_dpbf16;
  ember_quant_api::table().int4_linear_dpbf16 = &int4_linear_dpbf16;
  m.def("int8_linear_dpbf16", &int8_linear_dpbf16,
        "bf16 x [M, K] @ (int8 codes by pairs of k * scale[N])^T with vdpbf16ps, scale applied to the sum");
  m.def("int4_linear_dpbf16", &int4_linear_dpbf16,
        "bf16 x [M, K] @ (4-bit codes * scale + offset per group, rounded to bf16)^T with vdpbf16ps");
}
