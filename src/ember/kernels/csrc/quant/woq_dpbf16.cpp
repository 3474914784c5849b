// Weight-only linears for calls of more rows than a GEMV takes, on AVX512-BF16 without AMX: a call turns
// each panel of 32 output channels into bfloat16 pairs of k in a per-thread buffer, and every block of up to
// 12 rows multiplies the panel with `vdpbf16ps` (dpbf16_panels.h).
// - int8, one scale per channel: the codes are widened as they are (bfloat16 holds every code exactly)
//   and the scale multiplies the float32 sum: int8_gemv.cpp's arithmetic, summed in another order.
// - int4, a scale and an offset per group: the codes are dequantized as dequantize_bf16 does (code *
//   scale + offset, rounded to bfloat16), so a call computes what dequant_dense's matmul computes.
//   Input channels kept in float (GPTQ's bf16 channels) ride in the same panels: after a block is
//   dequantized, each kept column is overwritten with its bf16 value (the codes' value plus the float
//   channel's, rounded once when the operands are prepared), so they cost no products of their own.
// The codes are kept in panel order by pairs of k (ember.kernels.linear.weight_only repacks them once,
// same size); scales and offsets per group as [N / 16, G, 16].
#include <torch/extension.h>

#include <vector>

#include "dpbf16_panels.h"
#include "quant_api.h"

namespace {

#ifdef EMBER_DPBF16
using ember_dpbf16::kBlockN;

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

// Overwrite the kept columns of one dequantized 16-channel block (bfloat16 pairs [K/2][16]) with their
// values: `index` [C] (columns), `columns` [C][16] bfloat16 bits of this block's channels.
void patch_block_columns(const int64_t* index, const uint16_t* columns, int64_t count, uint32_t* out) {
  const __m512i low_half = _mm512_set1_epi32(0x0000FFFF);
  for (int64_t j = 0; j < count; ++j) {
    const int64_t k = index[j];
    uint32_t* word = out + kBlockN * (k >> 1);
    const __m512i value = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(columns + kBlockN * j)));
    const __m512i kept = _mm512_loadu_si512(word);  // the pair's other half stays
    const __m512i merged = (k & 1) ? _mm512_or_si512(_mm512_and_si512(kept, low_half), _mm512_slli_epi32(value, 16))
                                   : _mm512_or_si512(_mm512_andnot_si512(low_half, kept), value);
    _mm512_storeu_si512(word, merged);
  }
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
  ember_dpbf16::run_panels(x, n, scale.data_ptr<float>(), y,
                           [&](int64_t first, int64_t count, std::vector<uint32_t>& buffer) {
                             buffer.resize(2 * pairs * kBlockN);
                             for (int64_t b = 0; b < count; ++b)
                               widen_block_int8(cp + (first + b) * pairs * 32, pairs, buffer.data() + b * pairs * kBlockN);
                             return ember_dpbf16::Panel{buffer.data(), pairs * kBlockN, kBlockN};
                           });
#else
  TORCH_CHECK(false, "built without AVX512-BF16");
#endif
  return y;
}

// x bf16 [M, K]; codes uint8 [N / 16, K / 2, 16] (byte: k even low nibble, k odd high); scales, offsets
// float32 [N / 16, G, 16] with G = K / group_len; optionally channel_index int64 [C] (distinct columns) and
// channel_columns bf16 [N / 16, C, 16], the values those columns take instead of their codes'. Returns y bf16 [M, N].
torch::Tensor int4_linear_dpbf16(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, torch::Tensor offsets,
                                 int64_t group_len, c10::optional<torch::Tensor> channel_index,
                                 c10::optional<torch::Tensor> channel_columns) {
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
  TORCH_CHECK(channel_index.has_value() == channel_columns.has_value(),
              "channel_index and channel_columns come together");
  torch::Tensor index, columns;
  if (channel_index.has_value()) {
    index = channel_index->contiguous();
    columns = channel_columns->contiguous();
    TORCH_CHECK(index.dim() == 1 && index.scalar_type() == torch::kLong, "channel_index must be int64 [C]");
    TORCH_CHECK(columns.dim() == 3 && columns.size(0) == n / 16 && columns.size(1) == index.size(0) &&
                    columns.size(2) == 16 && columns.scalar_type() == torch::kBFloat16,
                "channel_columns must be bfloat16 [N / 16, C, 16]");
    const int64_t* ip = index.data_ptr<int64_t>();
    for (int64_t j = 0; j < index.size(0); ++j)
      TORCH_CHECK(ip[j] >= 0 && ip[j] < k, "channel_index holds ", ip[j], ", outside [0, ", k, ")");
  }
  const int64_t num_kept = index.defined() ? index.size(0) : 0;
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
  const int64_t* ip = num_kept ? index.data_ptr<int64_t>() : nullptr;
  const auto* colp = num_kept ? reinterpret_cast<const uint16_t*>(columns.data_ptr<at::BFloat16>()) : nullptr;
  ember_dpbf16::run_panels(x, n, nullptr, y, [&](int64_t first, int64_t count, std::vector<uint32_t>& buffer) {
    buffer.resize(2 * pairs * kBlockN);
    for (int64_t b = 0; b < count; ++b) {
      const int64_t block = first + b;
      dequant_block_int4(cp + block * pairs * 16, sp + block * groups * 16, op + block * groups * 16, pairs,
                         group_len / 2, buffer.data() + b * pairs * kBlockN);
      if (num_kept) patch_block_columns(ip, colp + block * num_kept * 16, num_kept, buffer.data() + b * pairs * kBlockN);
    }
    return ember_dpbf16::Panel{buffer.data(), pairs * kBlockN, kBlockN};
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
        "bf16 x [M, K] @ (4-bit codes * scale + offset per group, rounded to bf16; kept columns replaced)^T "
        "with vdpbf16ps",
        pybind11::arg("x"), pybind11::arg("codes"), pybind11::arg("scales"), pybind11::arg("offsets"),
        pybind11::arg("group_len"), pybind11::arg("channel_index") = pybind11::none(),
        pybind11::arg("channel_columns") = pybind11::none());
}
