// W4A8 linear on AVX512-VNNI, the way llama.cpp runs Q4 weights against Q8 activations: the activations
// are quantized per token in blocks of the weight group (symmetric int8, one scale per block), the
// 4-bit codes u (0..15) are the unsigned operand of `vpdpbusd` and the activation codes the signed one,
// so every group's dot product is an exact int32 sum A[m, n, g] = sum_k u[n, k] * xq[m, k]. With the
// weight w = u * s + o per group and x ~ xs * xq per block,
//   y[m, n] = sum_g xs[m, g] * (s[n, g] * A[m, n, g]) + o[n, g] * (xs[m, g] * Q[m, g]),  Q = sum_k xq,
// accumulated in float32 across groups (symmetric weights have o = -8 s). Integer products do twice the
// work of bf16 dot products per instruction, which is what a CPU without AMX has to offer batched calls.
//
// Weight codes are repacked once (ember.quant.w4a8.vnni_codes): per block of 16 output channels, 64
// bytes hold k values 8c..8c+7 of the 16 channels, byte 4l + i holding channel l's k = 8c + i in its low
// nibble and k = 8c + 4 + i in its high one, so one load, a shift and two masks give the two k quads.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "quant_api.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define EMBER_W4A8_VNNI 1
#endif

namespace {

#ifdef EMBER_W4A8_VNNI
constexpr int64_t kBlockN = 16;     // output channels per zmm of int32 sums
constexpr int64_t kChunkK = 8;      // k values per 64-byte chunk of codes
constexpr int kMaxRows = 6;         // activation rows per micro-kernel call
// Calls of 1-2 rows read their codes this far ahead, into L2 (each call's stream starts cold, and the
// panels are contiguous). On the Xeon, 8 KB into L1 took a W2 step's 120 decoder calls from 4.0-4.4 ms
// to 3.4-3.5 (3.6 at 4 KB); on the Zen 4, whose L1 has few miss buffers, 16 KB into L2 beat that in
// three alternating W2 runs out of three (TPOT 7.8 / 9.4 / 8.4 against 9.8 / 9.5 / 8.9 ms).
constexpr int64_t kPrefetchBytes = 16384;

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {  // bf16 is the high half of an fp32
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

template <typename T>
void store16(T* dst, __m512 v) {
  if constexpr (std::is_same_v<T, float>) _mm512_storeu_ps(dst, v);
  else _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh(v));
}

// Per token and block of `len` values: scale = max|x| / 127 (at least 1e-8 / 127), code = round(x /
// scale) ties to even, clamped to +-127 (as ember.quant.kernels.quantize_per_group), and the block's
// xs * sum(codes). len % 16 == 0. quantize_rows_int8 (quant_ops.cpp) on blocks viewed as rows gives the
// same codes, but with the sums taken in a second pass a decode-sized call measured 3.2 µs against 1.7.
template <typename T>
void quantize_blocks(const T* x, int64_t rows, int64_t k, int64_t len, int8_t* codes, float* xs, float* xsq) {
  const int64_t blocks = k / len;
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t b = 0; b < blocks; ++b) {
        const T* src = x + r * k + b * len;
        int8_t* dst = codes + r * k + b * len;
        __m512 vmax = _mm512_setzero_ps();
        for (int64_t i = 0; i < len; i += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(load16(src + i)));
        const float scale = std::max(_mm512_reduce_max_ps(vmax), 1e-8f) / 127.f;
        const __m512 vscale = _mm512_set1_ps(scale), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
        __m512i sum = _mm512_setzero_si512();
        for (int64_t i = 0; i < len; i += 16) {
          __m512 q = _mm512_roundscale_ps(_mm512_div_ps(load16(src + i), vscale),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          const __m512i qi = _mm512_cvtps_epi32(_mm512_min_ps(hi, _mm512_max_ps(lo, q)));
          sum = _mm512_add_epi32(sum, qi);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm512_cvtsepi32_epi8(qi));
        }
        xs[r * blocks + b] = scale;
        xsq[r * blocks + b] = scale * static_cast<float>(_mm512_reduce_add_epi32(sum));
      }
    }
  });
}

struct W4A8Problem {
  const int8_t* xq;    // [M, K] activation codes
  const float* xs;     // [M, G] block scales
  const float* xsq;    // [M, G] block scale * block sum of codes
  const uint8_t* w;    // [N / 16, K / 8, 64] repacked 4-bit codes
  const float* s;      // [N / 16, G, 16] weight scales
  const float* o;      // [N / 16, G, 16] weight offsets
  const float* bias;   // [N] or null
  int64_t m, n, k, len;
};

// Rows [m0, m0 + MR) against output blocks [nb, nb + NV): int32 sums per group, float32 across groups.
// MR = 6, NV = 2 keeps 12 + 12 accumulators in registers; 8 rows spilled (1024 rows of a SmolLM2 layer:
// 12.6 ms against 9.0-9.4 for 4 or 6 rows). Unpacking a panel's codes once per call instead of once
// per row block measured within noise: the products, not the unpacking, bound the loop.
template <int MR, int NV, typename T>
void micro(const W4A8Problem& p, int64_t m0, int64_t nb, T* y) {
  const int64_t groups = p.k / p.len, chunk_bytes = p.k / kChunkK * 64;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512 out[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) out[m][v] = _mm512_setzero_ps();
  const int8_t* xrow = p.xq + m0 * p.k;
  for (int64_t g = 0; g < groups; ++g) {
    __m512i acc[MR][NV];
    for (int m = 0; m < MR; ++m)
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_setzero_si512();
    for (int64_t c = g * p.len / kChunkK; c < (g + 1) * p.len / kChunkK; ++c) {
      __m512i lo[NV], hi[NV];
      for (int v = 0; v < NV; ++v) {
        const uint8_t* src = p.w + (nb + v) * chunk_bytes + c * 64;
        if constexpr (MR <= 2) _mm_prefetch(reinterpret_cast<const char*>(src + kPrefetchBytes), _MM_HINT_T1);
        const __m512i raw = _mm512_loadu_si512(src);
        lo[v] = _mm512_and_si512(raw, nibble);
        hi[v] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), nibble);
      }
      for (int m = 0; m < MR; ++m) {
        const int8_t* xc = xrow + m * p.k + c * kChunkK;
        const __m512i x0 = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(xc));
        const __m512i x1 = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(xc + 4));
        for (int v = 0; v < NV; ++v) {
          acc[m][v] = _mm512_dpbusd_epi32(acc[m][v], lo[v], x0);
          acc[m][v] = _mm512_dpbusd_epi32(acc[m][v], hi[v], x1);
        }
      }
    }
    for (int v = 0; v < NV; ++v) {
      const __m512 s = _mm512_loadu_ps(p.s + ((nb + v) * groups + g) * kBlockN);
      const __m512 o = _mm512_loadu_ps(p.o + ((nb + v) * groups + g) * kBlockN);
      for (int m = 0; m < MR; ++m) {
        const int64_t mg = (m0 + m) * groups + g;
        const __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[m][v]), s);
        out[m][v] = _mm512_fmadd_ps(t, _mm512_set1_ps(p.xs[mg]), out[m][v]);
        out[m][v] = _mm512_fmadd_ps(o, _mm512_set1_ps(p.xsq[mg]), out[m][v]);
      }
    }
  }
  for (int v = 0; v < NV; ++v) {
    const __m512 b = p.bias ? _mm512_loadu_ps(p.bias + (nb + v) * kBlockN) : _mm512_setzero_ps();
    for (int m = 0; m < MR; ++m) store16(y + (m0 + m) * p.n + (nb + v) * kBlockN, _mm512_add_ps(out[m][v], b));
  }
}

template <int NV, typename T>
void rows_of_panel(const W4A8Problem& p, int64_t nb, T* y) {
  int64_t m0 = 0;
  for (; m0 + kMaxRows <= p.m; m0 += kMaxRows) micro<kMaxRows, NV>(p, m0, nb, y);
  switch (p.m - m0) {
    case 0: break;
    case 1: micro<1, NV>(p, m0, nb, y); break;
    case 2: micro<2, NV>(p, m0, nb, y); break;
    case 3: micro<3, NV>(p, m0, nb, y); break;
    case 4: micro<4, NV>(p, m0, nb, y); break;
    default: micro<5, NV>(p, m0, nb, y); break;
  }
}

// Panels of two 16-channel blocks (one for an odd last block) split across threads; each panel's codes
// (K * 16 bytes) stay in L1 while every row block passes over them.
template <typename T>
void run_w4a8(const W4A8Problem& p, T* y) {
  const int64_t blocks = p.n / kBlockN, panels = (blocks + 1) / 2;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t panel = begin; panel < end; ++panel) {
      const int64_t nb = panel * 2;
      if (nb + 1 < blocks) rows_of_panel<2>(p, nb, y);
      else rows_of_panel<1>(p, nb, y);
    }
  });
}
#endif

// Activation codes int8 [M, K] per token and block of group_len values (a multiple of 16 dividing K),
// their scales and scale * code sums float32 [M, K / group_len]: what w4a8_linear quantizes first.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> quantize_groups_int8(torch::Tensor x, int64_t group_len) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kFloat32),
              "x must be bfloat16 or float32 [M, K]");
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(group_len > 0 && group_len % 16 == 0 && k % group_len == 0,
              "group_len must be a multiple of 16 dividing K");
  auto xq = torch::empty({m, k}, torch::dtype(torch::kInt8));
  auto xs = torch::empty({m, k / group_len}, torch::dtype(torch::kFloat32));
  auto xsq = torch::empty({m, k / group_len}, torch::dtype(torch::kFloat32));
#ifdef EMBER_W4A8_VNNI
  x = x.contiguous();
  if (x.scalar_type() == torch::kBFloat16) {
    quantize_blocks(x.data_ptr<at::BFloat16>(), m, k, group_len, xq.data_ptr<int8_t>(), xs.data_ptr<float>(),
                    xsq.data_ptr<float>());
  } else {
    quantize_blocks(x.data_ptr<float>(), m, k, group_len, xq.data_ptr<int8_t>(), xs.data_ptr<float>(),
                    xsq.data_ptr<float>());
  }
#else
  TORCH_CHECK(false, "built without AVX512-VNNI");
#endif
  return {xq, xs, xsq};
}

// x bf16 or float32 [M, K]; codes uint8 [N / 16, K / 8, 64] (the repack); scales, offsets float32
// [N / 16, G, 16]; group_len = K / G. Returns y [M, N] in x's dtype, bias included.
torch::Tensor w4a8_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, torch::Tensor offsets,
                          c10::optional<torch::Tensor> bias, int64_t group_len) {
  auto [xq, xs, xsq] = quantize_groups_int8(x, group_len);  // checks x and group_len
  const int64_t m = x.size(0), k = x.size(1), groups = k / group_len;
  TORCH_CHECK(codes.dim() == 3 && codes.scalar_type() == torch::kUInt8 && codes.size(1) * 8 == k &&
                  codes.size(2) == 64, "codes must be uint8 [N / 16, K / 8, 64]");
  const int64_t n = codes.size(0) * 16;
  for (const auto* t : {&scales, &offsets})
    TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->numel() == n * groups,
                "scales / offsets must be float32 [N / 16, G, 16]");
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->to(torch::kFloat32).contiguous();
    TORCH_CHECK(b.numel() == n, "bias must have N elements");
  }
  auto y = torch::empty({m, n}, x.options());
#ifdef EMBER_W4A8_VNNI
  if (m == 0) return y;
  codes = codes.contiguous();
  scales = scales.contiguous();
  offsets = offsets.contiguous();
  const W4A8Problem p{xq.data_ptr<int8_t>(), xs.data_ptr<float>(), xsq.data_ptr<float>(), codes.data_ptr<uint8_t>(),
                      scales.data_ptr<float>(), offsets.data_ptr<float>(),
                      b.defined() ? b.data_ptr<float>() : nullptr, m, n, k, group_len};
  if (x.scalar_type() == torch::kBFloat16) run_w4a8(p, y.data_ptr<at::BFloat16>());
  else run_w4a8(p, y.data_ptr<float>());
#endif
  return y;
}

}  // namespace

void register_w4a8(pybind11::module& m) {
  m.def("w4a8_linear", &w4a8_linear, "per-block int8 activations x repacked 4-bit codes (vpdpbusd), per-group rescale",
        pybind11::arg("x"), pybind11::arg("codes"), pybind11::arg("scales"), pybind11::arg("offsets"),
        pybind11::arg("bias"), pybind11::arg("group_len"));
  m.def("quantize_groups_int8", &quantize_groups_int8, "symmetric int8 per token and block of group_len values");
  ember_quant_api::table().w4a8_linear = &w4a8_linear;
}
