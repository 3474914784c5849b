// Weight-only int8 with one scale per output channel, for a few tokens (decode): y[m, n] =
// scale[n] * sum_k x[m, k] * code[n, k] in float32, rounded once to bfloat16. The scale multiplies the
// sum instead of each weight, so the codes are only widened. Each thread streams a band of weight
// rows, four at a time, and prefetches the rows 16 ahead: without the prefetch, 30 layers of codes
// coming from memory streamed at ~10 GB/s (as torch._weight_int8pack_mm does), with it at ~19 GB/s.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define EMBER_GEMV_AVX512 1
#endif

namespace {

constexpr int64_t kMaxTokens = 4;
constexpr int64_t kPrefetchRows = 16;

#ifdef EMBER_GEMV_AVX512
// Rows [n0, n0 + 4) of the weight against M float32 activation rows; K % 64 == 0.
template <int M>
void four_rows(const int8_t* w, const float* x, const float* scale, at::BFloat16* y, int64_t n, int64_t k,
               int64_t n0) {
  __m512 acc[4][M];
  for (int r = 0; r < 4; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  const int8_t* ahead = w + (n0 + kPrefetchRows) * k;
  const bool prefetch = n0 + kPrefetchRows + 4 <= n;
  for (int64_t i = 0; i < k; i += 16) {
    if (prefetch && i % 64 == 0) {  // one cache line of each of the four rows 16 rows on
      for (int r = 0; r < 4; ++r) _mm_prefetch(reinterpret_cast<const char*>(ahead + r * k + i), _MM_HINT_T0);
    }
    __m512 xv[M];
    for (int m = 0; m < M; ++m) xv[m] = _mm512_loadu_ps(x + m * k + i);
    for (int r = 0; r < 4; ++r) {
      const __m128i codes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (n0 + r) * k + i));
      const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes));
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int m = 0; m < M; ++m)
      y[m * n + n0 + r] = static_cast<at::BFloat16>(_mm512_reduce_add_ps(acc[r][m]) * scale[n0 + r]);
}
#endif

// x bf16 [M <= 4, K]; codes int8 [N, K]; scale float32 [N]. Needs N % 4 == 0 and K % 64 == 0.
torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor codes, torch::Tensor scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16 && x.size(0) <= kMaxTokens,
              "x must be bfloat16 [M <= 4, K]");
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == torch::kInt8 && codes.size(1) == x.size(1),
              "codes must be int8 [N, K]");
  const int64_t m = x.size(0), n = codes.size(0), k = codes.size(1);
  TORCH_CHECK(n % 4 == 0 && k % 64 == 0, "needs out_features % 4 == 0 and in_features % 64 == 0");
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
  at::parallel_for(0, n / 4, 16, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      switch (m) {
        case 1: four_rows<1>(w, xp, sp, yp, n, k, q * 4); break;
        case 2: four_rows<2>(w, xp, sp, yp, n, k, q * 4); break;
        case 3: four_rows<3>(w, xp, sp, yp, n, k, q * 4); break;
        default: four_rows<4>(w, xp, sp, yp, n, k, q * 4); break;
      }
    }
  });
#else
  TORCH_CHECK(false, "built without AVX-512");
#endif
  return y;
}

bool has_int8_gemv() {
#ifdef EMBER_GEMV_AVX512
  return true;
#else
  return false;
#endif
}

}  // namespace

void register_gemv(pybind11::module& m) {
  m.def("has_int8_gemv", &has_int8_gemv, "whether the AVX-512 int8 GEMV is compiled in");
  m.def("int8_gemv", &int8_gemv, "bf16 x [<= 4, K] @ (int8 codes [N, K] * scale[N])^T, scale applied to the sum");
}
