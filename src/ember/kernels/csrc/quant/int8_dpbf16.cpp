// Weight-only int8 with one scale per output channel, for calls of more rows than the GEMV takes:
// y[m, n] = scale[n] * sum_k x[m, k] * code[n, k] in float32, rounded once to bfloat16 (int8_gemv.cpp's
// arithmetic; only the order of the float32 sums differs). The codes are kept interleaved by pairs of k
// (ember.kernels.linear.weight_only repacks them once). A call widens each panel of 32 channels to
// bfloat16, which holds every code exactly, into a per-thread buffer, and every block of up to 12 rows
// multiplies the panel with `vdpbf16ps`: the products of two bfloat16 values are exact in float32.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define EMBER_DPBF16 1
#endif

namespace {

#ifdef EMBER_DPBF16
constexpr int64_t kBlockN = 16;  // channels per accumulator vector
constexpr int kMaxRows = 12;     // rows per micro-kernel call: 12 x 2 accumulators, 2 weight vectors, 1 broadcast

// One 16-channel block's codes [K/2][16][2] -> bfloat16 pairs [K/2][16] (word c: k even low, k odd high).
inline void widen_block(const int8_t* codes, int64_t pairs, uint32_t* out) {
  for (int64_t p = 0; p < pairs; ++p) {
    const int8_t* src = codes + 32 * p;
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16))));
    _mm512_storeu_si512(out + kBlockN * p, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  }
}

// MR rows of x (bfloat16 pairs, `x_pairs` words a row) against NB widened blocks of the panel.
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
    const __m512 s = _mm512_loadu_ps(scale + b * kBlockN);
    for (int m = 0; m < MR; ++m) {
      const __m256bh out = _mm512_cvtneps_pbh(_mm512_mul_ps(acc[m][b], s));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + m * n + b * kBlockN), (__m256i)out);
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
#endif

}  // namespace

// x bf16 [M, K]; codes int8 [N / 16, K / 2, 16, 2] (by pairs of k); scale float32 [N]. Returns y bf16 [M, N].
torch::Tensor int8_linear_dpbf16(torch::Tensor x, torch::Tensor codes, torch::Tensor scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16, "x must be bfloat16 [M, K]");
  TORCH_CHECK(codes.dim() == 4 && codes.scalar_type() == torch::kInt8 && codes.size(2) == 16 && codes.size(3) == 2 &&
                  codes.size(1) * 2 == x.size(1),
              "codes must be int8 [N / 16, K / 2, 16, 2]");
  const int64_t m = x.size(0), k = x.size(1), n = codes.size(0) * 16, pairs = k / 2;
  TORCH_CHECK(scale.numel() == n && scale.scalar_type() == torch::kFloat32, "scale must be float32 [N]");
  auto y = torch::empty({m, n}, x.options());
#ifdef EMBER_DPBF16
  if (m == 0) return y;
  x = x.contiguous();
  codes = codes.contiguous();
  scale = scale.contiguous();
  const auto* xp = reinterpret_cast<const uint32_t*>(x.data_ptr<at::BFloat16>());
  const int8_t* cp = codes.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  const int64_t blocks = n / kBlockN, panels = (blocks + 1) / 2;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> panel(2 * pairs * kBlockN);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t nb = 2 * i, count = std::min<int64_t>(2, blocks - nb);
      for (int64_t b = 0; b < count; ++b) widen_block(cp + (nb + b) * pairs * 32, pairs, panel.data() + b * pairs * kBlockN);
      for (int64_t m0 = 0; m0 < m; m0 += kMaxRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kMaxRows, m - m0));
        at::BFloat16* dst = yp + m0 * n + nb * kBlockN;
        if (count == 2) rows_block<2>(rows, panel.data(), pairs, xp + m0 * pairs, sp + nb * kBlockN, dst, n);
        else rows_block<1>(rows, panel.data(), pairs, xp + m0 * pairs, sp + nb * kBlockN, dst, n);
      }
    }
  });
#else
  TORCH_CHECK(false, "built without AVX512-BF16");
#endif
  return y;
}

void register_int8_dpbf16(pybind11::module& m) {
  m.def("int8_linear_dpbf16", &int8_linear_dpbf16,
        "bf16 x [M, K] @ (int8 codes by pairs of k * scale[N])^T with vdpbf16ps, scale applied to the sum");
}
