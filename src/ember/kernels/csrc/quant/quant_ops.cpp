// Native helpers of the quantized linears: dequantize packed weights to bfloat16 in one pass, and
// the per-token int8 quantization / int32 rescale around an integer matmul (W8A8). Built without
// -ffast-math so that rounding matches the PyTorch reference (x / scale, round half to even).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "gemv.h"
#include "isa.h"
#include "quant_api.h"

namespace {

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define EMBER_QUANT_AVX512 1

// 16 floats -> 16 bfloat16, round to nearest even (as c10::BFloat16 does for finite values).
inline void store_bf16x16(at::BFloat16* dst, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh(v));
}

// 16 codes (as int32 lanes) * scale + offset, multiply and add rounded separately like PyTorch's.
inline void store_dequant(at::BFloat16* dst, __m512i codes, __m512 scale, __m512 offset) {
  store_bf16x16(dst, _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(codes), scale), offset));
}
#endif

// One group of `len` columns of one row: w = code * scale + offset.
void dequantize_group(const int8_t* codes, int64_t len, float scale, float offset, at::BFloat16* dst) {
  int64_t k = 0;
#ifdef EMBER_QUANT_AVX512
  for (; k + 16 <= len; k += 16) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + k));
    store_dequant(dst + k, _mm512_cvtepi8_epi32(raw), _mm512_set1_ps(scale), _mm512_set1_ps(offset));
  }
#endif
  for (; k < len; ++k) dst[k] = static_cast<at::BFloat16>(codes[k] * scale + offset);
}

// The same for 4-bit codes packed two per byte (low nibble = even column); len is even.
void dequantize_group_int4(const uint8_t* packed, int64_t len, float scale, float offset, at::BFloat16* dst) {
  int64_t k = 0;
#ifdef EMBER_QUANT_AVX512
  const __m128i mask = _mm_set1_epi8(0x0F);
  for (; k + 16 <= len; k += 16) {
    const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + k / 2));  // 8 bytes
    const __m128i low = _mm_and_si128(raw, mask), high = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
    const __m128i ordered = _mm_unpacklo_epi8(low, high);  // l0 h0 l1 h1 ... = columns in order
    store_dequant(dst + k, _mm512_cvtepu8_epi32(ordered), _mm512_set1_ps(scale), _mm512_set1_ps(offset));
  }
#endif
  for (; k < len; k += 2) {
    const uint8_t byte = packed[k / 2];
    dst[k] = static_cast<at::BFloat16>((byte & 0x0F) * scale + offset);
    dst[k + 1] = static_cast<at::BFloat16>((byte >> 4) * scale + offset);
  }
}

// w = code * scale + offset per group; codes int8 [N, K] or uint8 [N, K / 2] (low nibble = even
// column). scales / offsets float32 [N, G]; offsets may be empty (symmetric: 0 at 8 bits, -8 * scale
// at 4 bits). Rows are split across threads; each is written once, in order.
torch::Tensor dequantize_bf16(torch::Tensor qweight, torch::Tensor scales, torch::Tensor offsets,
                              int64_t bits, int64_t in_features) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat32 && scales.dim() == 2, "scales must be float32 [N, G]");
  TORCH_CHECK(qweight.scalar_type() == (bits == 4 ? torch::kUInt8 : torch::kInt8), "qweight dtype does not match bits");
  qweight = qweight.contiguous();
  scales = scales.contiguous();
  const bool has_offsets = offsets.numel() > 0;
  if (has_offsets) {
    TORCH_CHECK(offsets.sizes() == scales.sizes() && offsets.scalar_type() == torch::kFloat32,
                "offsets must match scales");
    offsets = offsets.contiguous();
  }
  const int64_t rows = scales.size(0), groups = scales.size(1);
  TORCH_CHECK(in_features % groups == 0, "groups must divide in_features");
  const int64_t group_len = in_features / groups;
  TORCH_CHECK(bits == 8 || group_len % 2 == 0, "4-bit groups must have an even length");
  TORCH_CHECK(qweight.size(0) == rows && qweight.size(1) == (bits == 4 ? in_features / 2 : in_features),
              "qweight shape does not match scales and in_features");
  auto out = torch::empty({rows, in_features}, torch::dtype(torch::kBFloat16));
  const float* sp = scales.data_ptr<float>();
  const float* op = has_offsets ? offsets.data_ptr<float>() : nullptr;
  at::BFloat16* dst = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t g = 0; g < groups; ++g) {
        const float scale = sp[r * groups + g];
        const float offset = op ? op[r * groups + g] : (bits == 4 ? -8.f * scale : 0.f);
        const int64_t k0 = g * group_len;
        at::BFloat16* out_group = dst + r * in_features + k0;
        if (bits == 8) {
          dequantize_group(qweight.data_ptr<int8_t>() + r * in_features + k0, group_len, scale, offset, out_group);
        } else {
          dequantize_group_int4(qweight.data_ptr<uint8_t>() + r * (in_features / 2) + k0 / 2, group_len, scale,
                                offset, out_group);
        }
      }
    }
  });
  return out;
}

#ifdef EMBER_QUANT_AVX512
inline __m512 load_f32x16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load_f32x16(const at::BFloat16* p) {  // bf16 is the high half of an fp32
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
#endif

// Dynamic symmetric int8 of one row: scale = max|x| / 127 (at least 1e-8 / 127), code = round(x / scale)
// with ties to even. The vector loop divides and rounds exactly as the scalar tail does.
template <typename T>
void quantize_row(const T* row, int64_t cols, int8_t* out, float* scale_out, int8_t flip) {
  float amax = 0.f;
  int64_t k = 0;
#ifdef EMBER_QUANT_AVX512
  __m512 vmax = _mm512_setzero_ps();
  for (; k + 16 <= cols; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(load_f32x16(row + k)));
  amax = _mm512_reduce_max_ps(vmax);
#endif
  for (; k < cols; ++k) amax = std::max(amax, std::fabs(static_cast<float>(row[k])));
  const float scale = std::max(amax, 1e-8f) / 127.f;
  *scale_out = scale;
  k = 0;
#ifdef EMBER_QUANT_AVX512
  const __m512 vscale = _mm512_set1_ps(scale), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
  for (; k + 16 <= cols; k += 16) {
    __m512 q = _mm512_roundscale_ps(_mm512_div_ps(load_f32x16(row + k), vscale),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm512_min_ps(hi, _mm512_max_ps(lo, q));
    const __m128i codes = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(q));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k), _mm_xor_si128(codes, _mm_set1_epi8(flip)));
  }
#endif
  for (; k < cols; ++k) {
    const float q = std::nearbyint(static_cast<float>(row[k]) / scale);
    out[k] = static_cast<int8_t>(static_cast<int8_t>(std::min(127.f, std::max(-127.f, q))) ^ flip);
  }
}

template <typename T>
void quantize_rows(const T* src, int64_t rows, int64_t cols, int8_t* dst, float* scales, bool shift128) {
  // shift128: store code + 128 as uint8 (flip the sign bit), the zero-point form oneDNN's u8 x s8 matmul takes
  const int8_t flip = shift128 ? static_cast<int8_t>(0x80) : 0;
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) quantize_row(src + r * cols, cols, dst + r * cols, scales + r, flip);
  });
}

std::tuple<torch::Tensor, torch::Tensor> quantize_rows_int8(torch::Tensor x, bool shift128) {
  TORCH_CHECK(x.dim() == 2, "x must be [M, K]");
  x = x.contiguous();
  const int64_t rows = x.size(0), cols = x.size(1);
  auto codes = torch::empty({rows, cols}, torch::dtype(torch::kInt8));  // viewed as uint8 if shifted
  auto scales = torch::empty({rows, 1}, torch::dtype(torch::kFloat32));
  if (x.scalar_type() == torch::kBFloat16) {
    quantize_rows(x.data_ptr<at::BFloat16>(), rows, cols, codes.data_ptr<int8_t>(), scales.data_ptr<float>(), shift128);
  } else {
    TORCH_CHECK(x.scalar_type() == torch::kFloat32, "x must be bfloat16 or float32");
    quantize_rows(x.data_ptr<float>(), rows, cols, codes.data_ptr<int8_t>(), scales.data_ptr<float>(), shift128);
  }
  return {shift128 ? codes.view(torch::kUInt8) : codes, scales};
}

// The int8 KV cache's write with per-token scales: the KVH rows of x [T, KVH, D] of token t quantized
// as quantize_rows_int8 does, straight into slot slot_mapping[t] of codes [B, bs, KVH, D] and scales
// [B, bs, KVH]. One call in place of the PyTorch ops and two index_copy_ per tensor.
void write_rows_int8(torch::Tensor x, torch::Tensor slot_mapping, torch::Tensor codes, torch::Tensor scales) {
  TORCH_CHECK(x.dim() == 3 && codes.dim() == 4 && scales.dim() == 3, "x must be [T, KVH, D], codes [B, bs, KVH, D], scales [B, bs, KVH]");
  TORCH_CHECK(codes.scalar_type() == torch::kInt8 && scales.scalar_type() == torch::kFloat32 && codes.is_contiguous() &&
              scales.is_contiguous(), "codes must be contiguous int8 and scales contiguous float32");
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2);
  TORCH_CHECK(codes.size(2) == heads && codes.size(3) == dim && scales.size(0) == codes.size(0) &&
              scales.size(1) == codes.size(1) && scales.size(2) == heads, "x, codes and scales must agree in KVH and D");
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == tokens, "slot_mapping must be [T]");
  x = x.contiguous();
  slot_mapping = slot_mapping.to(torch::kInt64).contiguous();
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t num_slots = codes.size(0) * codes.size(1);
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(slots[t] >= 0 && slots[t] < num_slots, "slot ", slots[t], " is outside the cache's ", num_slots, " slots");
  }
  int8_t* code_ptr = codes.data_ptr<int8_t>();
  float* scale_ptr = scales.data_ptr<float>();
  const auto write = [&](const auto* src) {
    at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t h = 0; h < heads; ++h) {
          const int64_t row = slots[t] * heads + h;
          quantize_row(src + (t * heads + h) * dim, dim, code_ptr + row * dim, scale_ptr + row, 0);
        }
      }
    });
  };
  if (x.scalar_type() == torch::kBFloat16) {
    write(x.data_ptr<at::BFloat16>());
  } else {
    TORCH_CHECK(x.scalar_type() == torch::kFloat32, "x must be bfloat16 or float32");
    write(x.data_ptr<float>());
  }
}

// y = acc * x_scale[m] * w_scale[n] (+ bias[n]) in float32, stored as T.
template <typename A, typename T>
void rescale(const A* acc, const float* xs, const float* ws, const float* bias, int64_t rows, int64_t cols,
             T* dst) {
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float s = xs[r];
      const A* a = acc + r * cols;
      T* d = dst + r * cols;
      int64_t n = 0;
#ifdef EMBER_QUANT_AVX512
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        for (; n + 16 <= cols; n += 16) {
          __m512 av;
          if constexpr (std::is_same_v<A, float>) av = _mm512_loadu_ps(a + n);
          else av = _mm512_cvtepi32_ps(_mm512_loadu_si512(a + n));
          __m512 y = _mm512_mul_ps(_mm512_mul_ps(av, _mm512_set1_ps(s)), _mm512_loadu_ps(ws + n));
          if (bias) y = _mm512_add_ps(y, _mm512_loadu_ps(bias + n));
          store_bf16x16(d + n, y);
        }
      }
#endif
      for (; n < cols; ++n) d[n] = static_cast<T>(a[n] * s * ws[n] + (bias ? bias[n] : 0.f));
    }
  });
}

template <typename A>
void rescale_to(const torch::Tensor& acc, const float* xs, const float* ws, const float* bias, torch::Tensor& out) {
  const int64_t rows = acc.size(0), cols = acc.size(1);
  if (out.scalar_type() == torch::kBFloat16) {
    rescale(acc.data_ptr<A>(), xs, ws, bias, rows, cols, out.data_ptr<at::BFloat16>());
  } else {
    TORCH_CHECK(out.scalar_type() == torch::kFloat32, "dtype must be bfloat16 or float32");
    rescale(acc.data_ptr<A>(), xs, ws, bias, rows, cols, out.data_ptr<float>());
  }
}

// acc int32 (integer matmul) or float32 (a matmul that applied part of the scales) [M, N].
torch::Tensor rescale_rows(torch::Tensor acc, torch::Tensor x_scale, torch::Tensor w_scale,
                           c10::optional<torch::Tensor> bias, at::ScalarType dtype) {
  TORCH_CHECK(acc.dim() == 2 && (acc.scalar_type() == torch::kInt32 || acc.scalar_type() == torch::kFloat32),
              "acc must be int32 or float32 [M, N]");
  acc = acc.contiguous();
  const int64_t rows = acc.size(0), cols = acc.size(1);
  auto xs = x_scale.to(torch::kFloat32).contiguous().view({-1});
  auto ws = w_scale.to(torch::kFloat32).contiguous().view({-1});
  TORCH_CHECK(xs.numel() == rows && ws.numel() == cols, "scale sizes must match acc");
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->to(torch::kFloat32).contiguous().view({-1});
    TORCH_CHECK(b.numel() == cols, "bias size must match acc");
  }
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  auto out = torch::empty({rows, cols}, torch::dtype(dtype));
  if (acc.scalar_type() == torch::kInt32) {
    rescale_to<int32_t>(acc, xs.data_ptr<float>(), ws.data_ptr<float>(), bp, out);
  } else {
    rescale_to<float>(acc, xs.data_ptr<float>(), ws.data_ptr<float>(), bp, out);
  }
  return out;
}

}  // namespace

torch::Tensor w8a8_gemv_acc(torch::Tensor x_codes, torch::Tensor codes, torch::Tensor colsum);  // int8_gemv.cpp

// W8A8 for <= 4 tokens in one call: per-token codes, the VNNI GEMV's exact int32 sums, rescale_rows.
torch::Tensor w8a8_linear_gemv(torch::Tensor x, torch::Tensor codes, torch::Tensor colsum, torch::Tensor w_scale,
                               c10::optional<torch::Tensor> bias) {
  auto [x_codes, x_scale] = quantize_rows_int8(x, true);
  return rescale_rows(w8a8_gemv_acc(x_codes, codes, colsum), x_scale, w_scale, bias, x.scalar_type());
}

void register_woq(pybind11::module& m);   // woq_amx.cpp
void register_w8a8(pybind11::module& m);  // w8a8_amx.cpp
void register_gemv(pybind11::module& m);  // int8_gemv.cpp
void register_w4a8(pybind11::module& m);  // w4a8_vnni.cpp
void register_woq_dpbf16(pybind11::module& m);  // woq_dpbf16.cpp

ember_quant_api::Table& ember_quant_api::table() {
  static Table table{kVersion, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
  return table;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("compiled_isa", &ember_isa::compiled_isa, "instruction sets this build was compiled for");
  m.attr("max_gemv_tokens") = ember_gemv::kMaxTokens;
  m.def("dequantize_bf16", &dequantize_bf16, "packed int8/int4 weight -> bfloat16 [N, K]");
  m.def("quantize_rows_int8", &quantize_rows_int8, "dynamic symmetric int8 per row (uint8 code + 128 if shift128)",
        pybind11::arg("x"), pybind11::arg("shift128") = false);
  m.def("write_rows_int8", &write_rows_int8, "per-token int8 K or V rows quantized into their slots of a paged cache");
  m.def("rescale_rows", &rescale_rows, "accumulators * row scale * column scale (+ bias)");
  m.def("w8a8_linear_gemv", &w8a8_linear_gemv, "W8A8 linear for <= 4 tokens: quantize_rows_int8, VNNI GEMV, rescale_rows");
  register_woq(m);
  register_w8a8(m);
  register_gemv(m);
  register_w4a8(m);
  register_woq_dpbf16(m);
  ember_quant_api::table().write_rows_int8 = &write_rows_int8;
  ember_quant_api::table().w8a8_linear_gemv = &w8a8_linear_gemv;
  m.attr("c_api") = pybind11::capsule(&ember_quant_api::table(), ember_quant_api::kCapsuleName);  // decode_layers.cpp
}
