// AVX-512 helpers shared by the native attention and elementwise kernels: bfloat16 <-> float32, a
// vector 2^x, a lane maximum and the transposed reduction of 16 dot products (float or int32). The
// rounding is c10's (round to nearest even, NaN to the canonical quiet NaN), so the vector kernels
// round exactly where and as the PyTorch ops they replace.
#pragma once

#if defined(__AVX512F__)
#include <immintrin.h>
#include <cstdint>

namespace ember_simd {

// 16 bfloat16 values (natural order) -> 16 floats, exact.
inline __m512 load_bf16x16(const void* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// x rounded to the nearest bfloat16 (ties to even), kept as a float: c10's float -> BFloat16.
inline __m512 round_bf16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  r = _mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  return _mm512_castsi512_ps(_mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC00000)));
}

// Stores 16 floats that already hold bfloat16 values (round_bf16) as bfloat16.
inline void store_bf16x16(void* p, __m512 rounded) {
  const __m256i bits = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(rounded), 16));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bits);
}

// 2^x: 2^n * 2^f with f in [-1/2, 1/2], degree-6 Taylor polynomial for 2^f = e^(f ln 2)
// (rel. error ~1e-7); vscalefps takes huge negative n to 0 and huge positive n to infinity.
inline __m512 exp2_512(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(x, n), _mm512_set1_ps(0.69314718f));
  __m512 p = _mm512_set1_ps(1.f / 720);
  for (const float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// The maximum of the 16 lanes, in every lane (no scalar round trip).
inline __m512 broadcast_max(__m512 x) {
  x = _mm512_max_ps(x, _mm512_shuffle_f32x4(x, x, 0x4E));
  x = _mm512_max_ps(x, _mm512_shuffle_f32x4(x, x, 0xB1));
  x = _mm512_max_ps(x, _mm512_permute_ps(x, 0x4E));
  return _mm512_max_ps(x, _mm512_permute_ps(x, 0xB1));
}

// Transposed reduction: 16 vectors of partial dot products -> one vector of 16 sums, one
// lane-crossing shuffle and one or two blends per pair combined (15 pairs) instead of 16
// horizontal sums. Lane p of the result sums input bit_reverse4(p), so a caller that feeds token
// kBitReverse4[i] as input i gets token t in lane t.
inline __m512 add_halves(__m512 a, __m512 b) {  // 256-bit halves: a in lanes 0-1, b in 2-3
  return _mm512_add_ps(_mm512_mask_blend_ps(0xFF00, a, b), _mm512_shuffle_f32x4(a, b, 0x4E));
}
inline __m512 add_quarters(__m512 a, __m512 b) {  // 128-bit lanes, alternating a and b
  const __m512 swapped = _mm512_mask_blend_ps(0x0F0F, a, b);
  return _mm512_add_ps(_mm512_mask_blend_ps(0xF0F0, a, b), _mm512_shuffle_f32x4(swapped, swapped, 0xB1));
}
inline __m512 add_pairs(__m512 a, __m512 b) {  // within 128-bit lanes: 2 floats each
  return _mm512_add_ps(_mm512_mask_blend_ps(0xCCCC, a, b), _mm512_shuffle_ps(a, b, 0x4E));
}
inline __m512 add_neighbours(__m512 a, __m512 b) {  // within 128-bit lanes: 1 float each
  return _mm512_add_ps(_mm512_mask_blend_ps(0xAAAA, a, b), _mm512_permute_ps(_mm512_mask_blend_ps(0x5555, a, b), 0xB1));
}
// The same reduction over int32 lanes (exact), for dot products of integer codes.
inline __m512i add_halves(__m512i a, __m512i b) {
  return _mm512_add_epi32(_mm512_mask_blend_epi32(0xFF00, a, b), _mm512_shuffle_i32x4(a, b, 0x4E));
}
inline __m512i add_quarters(__m512i a, __m512i b) {
  const __m512i swapped = _mm512_mask_blend_epi32(0x0F0F, a, b);
  return _mm512_add_epi32(_mm512_mask_blend_epi32(0xF0F0, a, b), _mm512_shuffle_i32x4(swapped, swapped, 0xB1));
}
inline __m512i add_pairs(__m512i a, __m512i b) {
  const __m512 shuffled = _mm512_shuffle_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(b), 0x4E);
  return _mm512_add_epi32(_mm512_mask_blend_epi32(0xCCCC, a, b), _mm512_castps_si512(shuffled));
}
inline __m512i add_neighbours(__m512i a, __m512i b) {
  const __m512i swapped = _mm512_shuffle_epi32(_mm512_mask_blend_epi32(0x5555, a, b), static_cast<_MM_PERM_ENUM>(0xB1));
  return _mm512_add_epi32(_mm512_mask_blend_epi32(0xAAAA, a, b), swapped);
}
constexpr int kBitReverse4[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};

// The dot products of G heads with 16 tokens, token t in lane t of out[g] (Vec: __m512 or __m512i).
// dot(i, d) sets d[g] to head g's per-lane partial sums against token kBitReverse4[i] (input i);
// inputs are combined pairwise as soon as both are ready, so the live set stays in registers.
template <int G, typename Vec, typename Dot>
inline void transposed_dots(const Dot& dot, Vec* out) {
  Vec quads[G][4];
#pragma GCC unroll 4
  for (int quad = 0; quad < 4; ++quad) {
    Vec halves[G][2];
#pragma GCC unroll 2
    for (int half = 0; half < 2; ++half) {
      Vec dots[2][G];
#pragma GCC unroll 2
      for (int i = 0; i < 2; ++i) dot(4 * quad + 2 * half + i, dots[i]);
      for (int g = 0; g < G; ++g) halves[g][half] = add_halves(dots[0][g], dots[1][g]);
    }
    for (int g = 0; g < G; ++g) quads[g][quad] = add_quarters(halves[g][0], halves[g][1]);
  }
  for (int g = 0; g < G; ++g) out[g] = add_neighbours(add_pairs(quads[g][0], quads[g][1]), add_pairs(quads[g][2], quads[g][3]));
}

}  // namespace ember_simd
#endif
