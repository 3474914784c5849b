// Fused elementwise ops for the bfloat16 path: each replaces 3-8 small PyTorch ops per layer and
// reproduces their rounding steps exactly (float32 math, bfloat16 at the same points).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>

#include "simd_bf16.h"

namespace {

inline float f(at::BFloat16 x) { return static_cast<float>(x); }

#if defined(__AVX512F__)
using ember_simd::load_bf16x16;
using ember_simd::round_bf16;
using ember_simd::store_bf16x16;

// One head of RoPE, 16 pairs (i, i + half) at a time; the same rounding points as the scalar loop.
inline void rope_head_avx512(at::BFloat16* v, const at::BFloat16* c, const at::BFloat16* s, int64_t half) {
  for (int64_t i = 0; i < half; i += 16) {
    const __m512 x1 = load_bf16x16(v + i), x2 = load_bf16x16(v + i + half);
    const __m512 a1 = round_bf16(_mm512_mul_ps(x1, load_bf16x16(c + i)));
    const __m512 neg_x2 = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x2), _mm512_set1_epi32(INT32_MIN)));
    const __m512 b1 = round_bf16(_mm512_mul_ps(neg_x2, load_bf16x16(s + i)));
    const __m512 a2 = round_bf16(_mm512_mul_ps(x2, load_bf16x16(c + i + half)));
    const __m512 b2 = round_bf16(_mm512_mul_ps(x1, load_bf16x16(s + i + half)));
    store_bf16x16(v + i, round_bf16(_mm512_add_ps(a1, b1)));
    store_bf16x16(v + i + half, round_bf16(_mm512_add_ps(a2, b2)));
  }
}

// bf16(bf16(silu(g)) * u) for 16 values; e^-g as 2^(-g log2 e), division exact.
inline __m512 silu_mul_avx512(__m512 g, __m512 u) {
  const __m512 e = ember_simd::exp2_512(_mm512_mul_ps(g, _mm512_set1_ps(-1.44269504f)));
  const __m512 act = round_bf16(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e)));
  return round_bf16(_mm512_mul_ps(act, u));
}
#endif

}  // namespace

// RMSNorm as the reference computes it: y = w * bf16(x * rsqrt(mean(x^2) + eps)), x: [T, H].
torch::Tensor rms_norm_bf16(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && weight.scalar_type() == torch::kBFloat16,
              "rms_norm_bf16 takes bfloat16 tensors");
  x = x.contiguous();
  const int64_t hidden = x.size(-1), rows = x.numel() / hidden;
  auto out = torch::empty_like(x);
  const auto* xp = x.data_ptr<at::BFloat16>();
  const auto* wp = weight.contiguous().data_ptr<at::BFloat16>();
  auto* op = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const at::BFloat16* row = xp + r * hidden;
      float sum = 0.f;
      for (int64_t i = 0; i < hidden; ++i) sum += f(row[i]) * f(row[i]);
      const float inv = 1.f / std::sqrt(sum / hidden + static_cast<float>(eps));
      for (int64_t i = 0; i < hidden; ++i) {
        const at::BFloat16 normed = static_cast<at::BFloat16>(f(row[i]) * inv);
        op[r * hidden + i] = static_cast<at::BFloat16>(f(wp[i]) * f(normed));
      }
    }
  });
  return out;
}

// Rotate-half RoPE in place on x: [T, heads, D] with cos/sin: [T, 1, D] (bfloat16 tables).
void rope_bf16_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16, "rope_bf16_ takes bfloat16");
  TORCH_CHECK(x.stride(-1) == 1, "last dim must be contiguous");
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2), half = dim / 2;
  const int64_t token_stride = x.stride(0), head_stride = x.stride(1);
  cos = cos.contiguous();
  sin = sin.contiguous();
  auto* xp = x.data_ptr<at::BFloat16>();
  const auto* cp = cos.data_ptr<at::BFloat16>();
  const auto* sp = sin.data_ptr<at::BFloat16>();
  at::parallel_for(0, tokens, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const at::BFloat16* c = cp + t * dim;
      const at::BFloat16* s = sp + t * dim;
      for (int64_t h = 0; h < heads; ++h) {
        at::BFloat16* v = xp + t * token_stride + h * head_stride;
#if defined(__AVX512F__)
        if (half % 16 == 0) {
          rope_head_avx512(v, c, s, half);
          continue;
        }
#endif
        for (int64_t i = 0; i < half; ++i) {
          // Reference: bf16(bf16(x*cos) + bf16(rotate_half(x)*sin)), rotate_half = (-x2, x1).
          const float x1 = f(v[i]), x2 = f(v[i + half]);
          const float a1 = f(static_cast<at::BFloat16>(x1 * f(c[i])));
          const float b1 = f(static_cast<at::BFloat16>(-x2 * f(s[i])));
          const float a2 = f(static_cast<at::BFloat16>(x2 * f(c[i + half])));
          const float b2 = f(static_cast<at::BFloat16>(x1 * f(s[i + half])));
          v[i] = static_cast<at::BFloat16>(a1 + b1);
          v[i + half] = static_cast<at::BFloat16>(a2 + b2);
        }
      }
    }
  });
}

// SwiGLU gate: gate_up: [T, 2I] -> bf16(bf16(silu(gate)) * up), [T, I].
torch::Tensor silu_mul_bf16(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.scalar_type() == torch::kBFloat16, "silu_mul_bf16 takes bfloat16");
  gate_up = gate_up.contiguous();
  const int64_t inter = gate_up.size(-1) / 2, rows = gate_up.numel() / (2 * inter);
  auto out = torch::empty({rows, inter}, gate_up.options());
  const auto* gp = gate_up.data_ptr<at::BFloat16>();
  auto* op = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const at::BFloat16* g = gp + r * 2 * inter;
      int64_t i = 0;
#if defined(__AVX512F__)
      for (; i + 16 <= inter; i += 16)
        store_bf16x16(op + r * inter + i, silu_mul_avx512(load_bf16x16(g + i), load_bf16x16(g + inter + i)));
#endif
      for (; i < inter; ++i) {
        const float x = f(g[i]);
        const at::BFloat16 act = static_cast<at::BFloat16>(x / (1.f + std::exp(-x)));
        op[r * inter + i] = static_cast<at::BFloat16>(f(act) * f(g[inter + i]));
      }
    }
  });
  return out;
}

void register_fused_ops(pybind11::module& m) {
  m.def("rms_norm_bf16", &rms_norm_bf16, "RMSNorm, bfloat16");
  m.def("rope_bf16_", &rope_bf16_, "rotate-half RoPE in place, bfloat16");
  m.def("silu_mul_bf16", &silu_mul_bf16, "silu(gate) * up, bfloat16");
}
