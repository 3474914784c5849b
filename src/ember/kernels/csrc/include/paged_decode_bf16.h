// The AVX-512 pieces of the bfloat16 paged decode kernels (paged_decode.cpp): a chunk of 16 positions'
// K/V rows widened to float32, their scores against a tile of query heads (the transposed reduction of
// simd_bf16.h), the online softmax and the P.V accumulation, per sequence state. Rows are read either
// straight from the cache (ChunkRows) or from a copy widened once (WidenedRows).
#pragma once

#if defined(__AVX512F__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "simd_bf16.h"
#define EMBER_HAS_AVX512 1

namespace ember_decode {

constexpr int kMaxVecs = 16;   // head_dim up to 256
constexpr int kMaxHeads = 32;  // query heads per sequence
constexpr int kChunk = 16;     // tokens scored together: one vector of 16 scores
constexpr int kHeadTile = 3;   // query heads served per pass over a chunk's rows (register budget)
constexpr int kDimTile = 4;    // accumulator vectors per head and pass in P.V (register budget)
alignas(64) constexpr uint16_t kZeroRow[16 * kMaxVecs] = {};  // stands in for tokens past the end

// Vector j of a bfloat16 row of 16 * NV values, as floats. Each 32 values are one load split into
// the even (shift) and odd (mask) elements, so vector 2i holds values 32i + 2l and 2i+1 the ones
// after; q, K and V use this same order, and store_head undoes it. A last 16 values (odd NV) come
// in natural order. vdpbf16ps would skip the widening but measured ~2 cycles an instruction here,
// while one widening serves every query head of the group.
template <int NV>
inline __m512 widen(const uint16_t* row, int j) {
  if (NV % 2 == 1 && j == NV - 1) {
    const __m256i tail = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 16 * j));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(tail), 16));
  }
  const __m512i x = _mm512_loadu_si512(row + 32 * (j / 2));
  if (j % 2 == 0) return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
  return _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// 16 floats -> 16 bfloat16, round to nearest even (finite inputs).
inline __m256i to_bf16x16(__m512 x) {
#if defined(__AVX512BF16__)
  return (__m256i)_mm512_cvtneps_pbh(x);
#else
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
#endif
}

using ember_simd::broadcast_max;  // simd_bf16.h
using ember_simd::exp2_512;

using ember_simd::kBitReverse4;  // input i of the transposed reduction is token kBitReverse4[i]

// One KV head's K and V rows over a chunk (the zero row past the end), and its rows over the next
// chunk: those are prefetched a few lines at a time while this chunk is computed, since blocks sit
// at random places the hardware prefetcher cannot guess, and a burst of prefetches would stall on
// the L1 miss buffers.
struct ChunkRows {
  const uint16_t* k[kChunk];
  const uint16_t* v[kChunk];
  const uint16_t* next_k[kChunk];
  const uint16_t* next_v[kChunk];
};

// Into L2, not L1: on a Zen 4 (2 threads, 48 sequences x 310 positions, 30 layers from memory) the
// kernel read K/V at 10.5 GB/s with L1 prefetches and 17.7-18.4 GB/s with L2 ones; L1's few miss
// buffers were the limit.
template <int NV>
inline void prefetch_row(const uint16_t* row) {
  for (int byte = 0; byte < 32 * NV; byte += 64) _mm_prefetch(reinterpret_cast<const char*>(row) + byte, _MM_HINT_T1);
}

// A chunk's K and V rows widened to float32 once, for the query heads of every row of a verification
// span (see decode_span_bf16_avx512); tokens past the chunk's end are zero, as kZeroRow widens.
template <int NV>
struct WidenedRows {
  __m512 k[kChunk][NV], v[kChunk][NV];
};

// Element j of K/V row t of a chunk, and the prefetch of the next chunk's row i, from either form.
template <int NV>
inline __m512 key(const ChunkRows& rows, int t, int j) { return widen<NV>(rows.k[t], j); }
template <int NV>
inline __m512 key(const WidenedRows<NV>& rows, int t, int j) { return rows.k[t][j]; }
template <int NV>
inline __m512 value(const ChunkRows& rows, int t, int j) { return widen<NV>(rows.v[t], j); }
template <int NV>
inline __m512 value(const WidenedRows<NV>& rows, int t, int j) { return rows.v[t][j]; }
template <int NV>
inline void prefetch_next_key(const ChunkRows& rows, int i) { prefetch_row<NV>(rows.next_k[i]); }
template <int NV>
inline void prefetch_next_key(const WidenedRows<NV>&, int) {}  // done while widening
template <int NV>
inline void prefetch_next_value(const ChunkRows& rows, int i) { prefetch_row<NV>(rows.next_v[i]); }
template <int NV>
inline void prefetch_next_value(const WidenedRows<NV>&, int) {}

// Scores of G heads (q pre-scaled, [G][NV]) against the 16 K rows of a chunk: token t in lane t.
// Each K row is widened once for the G heads; dot products are combined as soon as two are ready,
// so the live set stays in registers.
template <int NV, int G, typename Rows>
inline void group_scores(const __m512 (*q)[NV], const Rows& rows, __m512* scores) {
  ember_simd::transposed_dots<G>([&](int i, __m512* dots) {
    const int t = kBitReverse4[i];
    prefetch_next_key<NV>(rows, i);  // ascending, as the hardware prefetcher likes
    for (int g = 0; g < G; ++g) dots[g] = _mm512_mul_ps(q[g][0], key<NV>(rows, t, 0));
#pragma GCC unroll 16
    for (int j = 1; j < NV; ++j) {
      const __m512 k = key<NV>(rows, t, j);
      for (int g = 0; g < G; ++g) dots[g] = _mm512_fmadd_ps(q[g][j], k, dots[g]);
    }
  }, scores);
}

// Online softmax over one chunk, in base 2 (q carries scale * log2(e)): returns the probabilities
// under the new running maximum (0 in the lanes past the end) and sets `correction`, the factor
// for what was accumulated before. row_max holds the maximum in every lane.
inline __m512 softmax_chunk(__m512 scores, __mmask16 valid, __m512& row_max, __m512& row_sum, __m512& correction) {
  scores = _mm512_mask_mov_ps(_mm512_set1_ps(-1e30f), valid, scores);
  const __m512 new_max = _mm512_max_ps(row_max, broadcast_max(scores));
  const __m512 probs = exp2_512(_mm512_sub_ps(scores, new_max));
  correction = exp2_512(_mm512_sub_ps(row_max, new_max));
  row_sum = _mm512_fmadd_ps(row_sum, correction, probs);
  row_max = new_max;
  return probs;
}

// acc[g] = acc[g] * correction[g] + sum_t probs[g][t] * V[t] for G heads, kDimTile accumulator
// vectors at a time; each V row slice is widened once for the G heads.
template <int NV, int G, int J0 = 0, typename Rows>
inline void group_values(__m512 (*acc)[NV], const __m512* correction, const float (*probs)[kChunk],
                         const Rows& rows, int n) {
  constexpr int D = std::min(kDimTile, NV - J0);
  __m512 a[G][D];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < D; ++j) a[g][j] = _mm512_mul_ps(acc[g][J0 + j], correction[g]);
  for (int t = 0; t < n; ++t) {
    if (J0 == 0) prefetch_next_value<NV>(rows, t);
    __m512 v[D];
    for (int j = 0; j < D; ++j) v[j] = value<NV>(rows, t, J0 + j);
    for (int g = 0; g < G; ++g) {
      const __m512 p = _mm512_set1_ps(probs[g][t]);
      for (int j = 0; j < D; ++j) a[g][j] = _mm512_fmadd_ps(p, v[j], a[g][j]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < D; ++j) acc[g][J0 + j] = a[g][j];
  if constexpr (J0 + D < NV) group_values<NV, G, J0 + D>(acc, correction, probs, rows, n);
}

// acc * inv back to natural dim order (see widen), rounded to bfloat16.
template <int NV>
inline void store_head(const __m512* acc, float inv, uint16_t* dst) {
  const __m512 scale = _mm512_set1_ps(inv);
  const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
  for (int j = 0; j < NV / 2; ++j) {
    const __m512 even = _mm512_mul_ps(acc[2 * j], scale), odd = _mm512_mul_ps(acc[2 * j + 1], scale);
    _mm256_storeu_si256((__m256i*)(dst + 32 * j), to_bf16x16(_mm512_permutex2var_ps(even, first, odd)));
    _mm256_storeu_si256((__m256i*)(dst + 32 * j + 16), to_bf16x16(_mm512_permutex2var_ps(even, second, odd)));
  }
  if (NV % 2 == 1) _mm256_storeu_si256((__m256i*)(dst + 16 * (NV - 1)), to_bf16x16(_mm512_mul_ps(acc[NV - 1], scale)));
}

// Element offsets of the rows of positions [start, start + n) (KV head 0), through the block table.
inline void chunk_offsets(const int64_t* table, int64_t start, int n, int64_t block_size, int64_t token_stride,
                          int64_t* offsets) {
  int64_t b = start / block_size, slot = start % block_size;
  for (int t = 0; t < n; ++t) {
    offsets[t] = (table[b] * block_size + slot) * token_stride;
    if (++slot == block_size) slot = 0, ++b;
  }
}

// Running state of one sequence: query (widened, pre-scaled), softmax maximum and sum, and the
// unnormalized output, per query head.
template <int NV>
struct SeqState {
  __m512 q[kMaxHeads][NV], acc[kMaxHeads][NV], row_max[kMaxHeads], row_sum[kMaxHeads];
};

// Query heads [h, h + G), which share one KV head, over one chunk of n <= 16 tokens. Not inlined:
// inlined into the head-tile switch, GCC hoists and spills the K rows (7% slower).
template <int NV, int G, typename Rows>
__attribute__((noinline)) void attend_heads(SeqState<NV>& st, int64_t h, const Rows& rows, int n) {
  __m512 scores[G], correction[G];
  alignas(64) float probs[G][kChunk];
  group_scores<NV, G>(st.q + h, rows, scores);
  const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1);
  for (int g = 0; g < G; ++g)
    _mm512_store_ps(probs[g], softmax_chunk(scores[g], valid, st.row_max[h + g], st.row_sum[h + g], correction[g]));
  group_values<NV, G>(st.acc + h, correction, probs, rows, n);
}

// The `group` query heads in state slots [first, first + group), which share one KV head, over one chunk
// of n tokens, in tiles of up to kHeadTile.
template <int NV, typename Rows>
void attend_group(SeqState<NV>& st, int64_t first, int64_t group, const Rows& rows, int n) {
  static_assert(kHeadTile == 3, "the switch below covers tiles of 1-3 heads");
  for (int64_t g = 0; g < group; g += kHeadTile) {
    switch (std::min<int64_t>(group - g, kHeadTile)) {
      case 3: attend_heads<NV, 3>(st, first + g, rows, n); break;
      case 2: attend_heads<NV, 2>(st, first + g, rows, n); break;
      default: attend_heads<NV, 1>(st, first + g, rows, n);
    }
  }
}

// State slot `slot` set up for one query head (16 * NV values at q): pre-scaled for the base-2 softmax,
// nothing accumulated yet.
template <int NV>
inline void start_head(SeqState<NV>& st, int64_t slot, const uint16_t* q, float scale) {
  const __m512 q_scale = _mm512_set1_ps(scale * 1.44269504f);  // scale * log2(e)
  for (int j = 0; j < NV; ++j) {
    st.q[slot][j] = _mm512_mul_ps(widen<NV>(q, j), q_scale);
    st.acc[slot][j] = _mm512_setzero_ps();
  }
  st.row_sum[slot] = _mm512_setzero_ps();
  st.row_max[slot] = _mm512_set1_ps(-1e30f);  // finite: the build uses -ffast-math
}

// State slot `slot`'s output, normalized by its softmax sum, as bfloat16 at out.
template <int NV>
inline void finish_head(const SeqState<NV>& st, int64_t slot, uint16_t* out) {
  const float sum = _mm512_reduce_add_ps(st.row_sum[slot]);
  store_head<NV>(st.acc[slot], sum > 0.f ? 1.f / sum : 0.f, out);
}

// All query heads over one chunk of n tokens (next_n in the next chunk): per KV head, its rows
// serve the group's heads in tiles of up to kHeadTile.
template <int NV>
void attend_chunk(SeqState<NV>& st, const uint16_t* k_ptr, const uint16_t* v_ptr, const int64_t* offsets, int n,
                  const int64_t* next_offsets, int next_n, int64_t num_kv_heads, int64_t group) {
  ChunkRows rows;
  for (int64_t kv = 0; kv < num_kv_heads; ++kv) {
    for (int t = 0; t < kChunk; ++t) {
      rows.k[t] = t < n ? k_ptr + offsets[t] + kv * 16 * NV : kZeroRow;
      rows.v[t] = t < n ? v_ptr + offsets[t] + kv * 16 * NV : kZeroRow;
      rows.next_k[t] = t < next_n ? k_ptr + next_offsets[t] + kv * 16 * NV : kZeroRow;
      rows.next_v[t] = t < next_n ? v_ptr + next_offsets[t] + kv * 16 * NV : kZeroRow;
    }
    attend_group<NV>(st, kv * group, group, rows, n);
  }
}

}  // namespace ember_decode
#endif
