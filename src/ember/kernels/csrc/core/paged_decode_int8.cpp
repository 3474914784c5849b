// Decode attention over an int8 paged KV cache: codes are read block by block through the block table
// and never widened into a float copy; with AVX512-VNNI they are multiplied as integers. A per-token scale multiplies a whole score (K) or probability
// (V); per-channel scales are folded into the query (K) and into the output (V). Outlier tokens add
// a 4-bit residual, found through a slot -> residual-row index. Online softmax in float32.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

namespace {

// K or V of one layer: codes [num_blocks * block_size, KVH, D]; scales per slot and KV head
// ([slots, KVH]) or per channel ([KVH, D]); residual rows [R, KVH, D / 2] (two 4-bit codes a byte,
// offset by 8) with scales [R, KVH], found by res_index [slots] (-1: none). res_index is null when
// the cache keeps no residuals.
struct Int8Rows {
  const int8_t* codes;
  const float* scales;
  bool per_token;
  const int32_t* res_index;
  const uint8_t* res_codes;
  const float* res_scales;
};

Int8Rows rows_of(const torch::Tensor& codes, const torch::Tensor& scales, const torch::Tensor& res_index,
                 const torch::Tensor& res_codes, const torch::Tensor& res_scales) {
  const bool has_res = res_index.numel() > 0;
  return {codes.data_ptr<int8_t>(), scales.data_ptr<float>(), scales.dim() == 3,
          has_res ? res_index.data_ptr<int32_t>() : nullptr, has_res ? res_codes.data_ptr<uint8_t>() : nullptr,
          has_res ? res_scales.data_ptr<float>() : nullptr};
}

inline float dot_codes(const float* q, const int8_t* codes, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < n; ++d) s += q[d] * static_cast<float>(codes[d]);
  return s;
}

inline float dot_nibbles(const float* q, const uint8_t* packed, int64_t half) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < half; ++i) {
    s += q[2 * i] * static_cast<float>((packed[i] & 15) - 8) + q[2 * i + 1] * static_cast<float>((packed[i] >> 4) - 8);
  }
  return s;
}

inline void add_nibbles(float w, const uint8_t* packed, int64_t half, float* acc) {
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    acc[2 * i] += w * static_cast<float>((packed[i] & 15) - 8);
    acc[2 * i + 1] += w * static_cast<float>((packed[i] >> 4) - 8);
  }
}

template <typename T>
void decode_int8_kernel(const torch::Tensor& q, const Int8Rows& k, const Int8Rows& v, int64_t block_size,
                        int64_t num_kv_heads, const torch::Tensor& block_tables, const torch::Tensor& seq_lens,
                        double scale, torch::Tensor& out) {
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t group = num_heads / num_kv_heads, max_blocks = block_tables.size(1), half = head_dim / 2;
  const T* q_ptr = q.data_ptr<T>();
  const int64_t* table_ptr = block_tables.data_ptr<int64_t>();
  const int64_t* len_ptr = seq_lens.data_ptr<int64_t>();
  T* out_ptr = out.data_ptr<T>();
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, num_seqs, 1, [&](int64_t begin, int64_t end) {
    const int64_t width = num_heads * head_dim;
    // qf: the scaled query; qk: qf times K's channel scales (static), so a score is one int8 dot.
    std::vector<float> qf(width), qk(width), acc(width), acc_res(width), probs(block_size);
    std::vector<float> row_max(num_heads), row_sum(num_heads);
    for (int64_t seq = begin; seq < end; ++seq) {
      const int64_t seq_len = std::min(len_ptr[seq], max_blocks * block_size);
      const T* qs = q_ptr + seq * width;
      for (int64_t i = 0; i < width; ++i) qf[i] = static_cast<float>(qs[i]) * fscale;
      for (int64_t h = 0; h < num_heads; ++h) {  // head h reads KV head h / group
        const float* ks = k.per_token ? nullptr : k.scales + (h / group) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) qk[h * head_dim + d] = qf[h * head_dim + d] * (ks != nullptr ? ks[d] : 1.f);
      }
      std::fill(row_max.begin(), row_max.end(), -1e30f);  // finite: built with -ffast-math
      std::fill(row_sum.begin(), row_sum.end(), 0.f);
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(acc_res.begin(), acc_res.end(), 0.f);
      const int64_t num_blocks = (seq_len + block_size - 1) / block_size;
      for (int64_t b = 0; b < num_blocks; ++b) {
        const int64_t first_slot = table_ptr[seq * max_blocks + b] * block_size;
        const int64_t n = std::min(block_size, seq_len - b * block_size);
        for (int64_t h = 0; h < num_heads; ++h) {
          const int64_t kv = h / group;
          const float* qh = qf.data() + h * head_dim;
          float block_max = row_max[h];
          for (int64_t t = 0; t < n; ++t) {
            const int64_t row = (first_slot + t) * num_kv_heads + kv;  // [slot, kv head]
            float s = dot_codes(qk.data() + h * head_dim, k.codes + row * head_dim, head_dim);
            if (k.per_token) s *= k.scales[row];
            if (k.res_index != nullptr) {
              const int32_t r = k.res_index[first_slot + t];
              if (r >= 0) s += k.res_scales[r * num_kv_heads + kv] * dot_nibbles(qh, k.res_codes + (r * num_kv_heads + kv) * half, half);
            }
            probs[t] = s;
            block_max = std::max(block_max, s);
          }
          // Rescale what was accumulated under the old maximum (online softmax).
          const float correction = std::exp(row_max[h] - block_max);
          float* ah = acc.data() + h * head_dim;
          float* rh = acc_res.data() + h * head_dim;
          row_sum[h] *= correction;
#pragma omp simd
          for (int64_t d = 0; d < head_dim; ++d) ah[d] *= correction;
          if (v.res_index != nullptr) {
#pragma omp simd
            for (int64_t d = 0; d < head_dim; ++d) rh[d] *= correction;
          }
          float block_sum = 0.f;
          for (int64_t t = 0; t < n; ++t) {
            probs[t] = std::exp(probs[t] - block_max);
            block_sum += probs[t];
          }
          row_sum[h] += block_sum;
          for (int64_t t = 0; t < n; ++t) {
            const int64_t row = (first_slot + t) * num_kv_heads + kv;
            const float w = v.per_token ? probs[t] * v.scales[row] : probs[t];
            const int8_t* vt = v.codes + row * head_dim;
#pragma omp simd
            for (int64_t d = 0; d < head_dim; ++d) ah[d] += w * static_cast<float>(vt[d]);
            if (v.res_index != nullptr) {
              const int32_t r = v.res_index[first_slot + t];
              if (r >= 0) add_nibbles(probs[t] * v.res_scales[r * num_kv_heads + kv], v.res_codes + (r * num_kv_heads + kv) * half, half, rh);
            }
          }
          row_max[h] = block_max;
        }
      }
      T* dst = out_ptr + seq * width;
      for (int64_t h = 0; h < num_heads; ++h) {
        const float inv = row_sum[h] > 0.f ? 1.f / row_sum[h] : 0.f;
        const float* vs = v.per_token ? nullptr : v.scales + (h / group) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) {
          const float a = vs != nullptr ? acc[h * head_dim + d] * vs[d] : acc[h * head_dim + d];
          dst[h * head_dim + d] = static_cast<T>((a + acc_res[h * head_dim + d]) * inv);
        }
      }
    }
  });
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#include "simd_bf16.h"
#define EMBER_HAS_INT8_VNNI 1

constexpr int kMaxTiles = 4;   // head_dim up to 256, in tiles of 64
constexpr int kMaxHeads = 32;  // query heads per sequence
constexpr int kChunk = 16;     // positions per softmax step: one vector of scores
constexpr int kHeadTile = 3;   // query heads served per pass over a chunk's rows (register budget)
// int16 codes of the query and of the softmax weights. No int32 sum can overflow: a score adds at
// most 256 products of |q| <= 32767 and |code| <= 127 (1.07e9), a chunk's weighted V sum 16 (6.7e7).
constexpr float kInt16Max = 32767.f;
alignas(64) constexpr int8_t kZeroCodes[64 * kMaxTiles] = {};  // stands in for positions past the end

// 32 codes -> 32 int16, natural order.
inline __m512i widen16(const int8_t* codes) {
  return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes)));
}

// 32 floats (two vectors) -> 32 int16 codes of x * inv_step, rounded to nearest.
inline __m512i to_int16(__m512 lo, __m512 hi, __m512 inv_step) {
  const __m256i a = _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(lo, inv_step)));
  const __m256i b = _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(hi, inv_step)));
  return _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
}

// Running state of one sequence. The query is held as int16 codes with one step per head: it
// carries the softmax scale, log2(e) and K's per-channel scales, and its rounding error (2^-16 of
// the head's largest value) is below bfloat16's. acc is kept in the lane order of group_values.
template <int NT>
struct Int8SeqState {
  __m512i q[kMaxHeads][2 * NT];
  __m512 q_step[kMaxHeads], row_max[kMaxHeads], row_sum[kMaxHeads];  // row_max in every lane; row_sum by lane
  __m512 acc[kMaxHeads][4 * NT];
};

// One KV head's rows over a chunk (the zero row past the end) and the chunk's per-token scales (1
// for per-channel scales, which are folded into q and the output).
struct Int8Chunk {
  const int8_t* k[kChunk];
  const int8_t* v[kChunk];
  alignas(64) float k_scale[kChunk];
  alignas(64) float v_scale[kChunk];
};

// Scores of G heads against the chunk's 16 K rows as exact int32 sums, token t in lane t: each K
// row is widened to int16 once for the G heads and multiplied by vpdpwssd (32 products an
// instruction); the dot products are combined by simd_bf16.h's transposed_dots.
template <int NT, int G>
inline void group_dots(const __m512i (*q)[2 * NT], const Int8Chunk& chunk, __m512i* dots_out) {
  ember_simd::transposed_dots<G>([&](int i, __m512i* dots) {
    const int8_t* row = chunk.k[ember_simd::kBitReverse4[i]];
    for (int g = 0; g < G; ++g) dots[g] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int j = 0; j < 2 * NT; ++j) {
      const __m512i k = widen16(row + 32 * j);
      for (int g = 0; g < G; ++g) dots[g] = _mm512_dpwssd_epi32(dots[g], k, q[g][j]);
    }
  }, dots_out);
}

// sum_t w[g][t] * V[t] for G heads, as int32: the weights are int16 codes (two positions in each
// 32-bit word), and the V rows of positions 2i and 2i+1 are interleaved so one vpdpwssd adds both
// positions' products for 16 channels. Per 64-channel tile, accumulator m holds, in 128-bit lane L,
// channels 8L + 4(m % 2) + [0, 4) of the tile's half m / 2 (unpack's lane order; store_int8_head
// restores the natural one). n_pairs covers the chunk's positions, the zero row filling an odd end.
template <int NT, int G>
inline void group_values(const uint32_t (*w)[kChunk / 2], const Int8Chunk& chunk, int n_pairs,
                         const __m512* w_step, const __m512* correction, __m512 (*acc)[4 * NT]) {
  for (int tile = 0; tile < NT; ++tile) {
    __m512i sums[G][4];
    for (int g = 0; g < G; ++g)
      for (int m = 0; m < 4; ++m) sums[g][m] = _mm512_setzero_si512();
    for (int i = 0; i < n_pairs; ++i) {
      const int8_t* first = chunk.v[2 * i] + 64 * tile;
      const int8_t* second = chunk.v[2 * i + 1] + 64 * tile;
      const __m512i lo0 = widen16(first), hi0 = widen16(first + 32);
      const __m512i lo1 = widen16(second), hi1 = widen16(second + 32);
      const __m512i pairs[4] = {_mm512_unpacklo_epi16(lo0, lo1), _mm512_unpackhi_epi16(lo0, lo1),
                                _mm512_unpacklo_epi16(hi0, hi1), _mm512_unpackhi_epi16(hi0, hi1)};
      for (int g = 0; g < G; ++g) {
        const __m512i weights = _mm512_set1_epi32(static_cast<int>(w[g][i]));
        for (int m = 0; m < 4; ++m) sums[g][m] = _mm512_dpwssd_epi32(sums[g][m], pairs[m], weights);
      }
    }
    for (int g = 0; g < G; ++g) {
      for (int m = 0; m < 4; ++m) {
        __m512& a = acc[g][4 * tile + m];
        a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[g][m]), w_step[g], _mm512_mul_ps(a, correction[g]));
      }
    }
  }
}

// Query heads [h, h + G), which share one KV head, over one chunk of n <= 16 positions: scores,
// online softmax in base 2 (float32), then the weights p * V's per-token scale as int16 codes with
// one step per head and chunk (2^-16 of the chunk's largest weight).
template <int NT, int G>
__attribute__((noinline)) void attend_int8_heads(Int8SeqState<NT>& st, int64_t h, const Int8Chunk& chunk, int n) {
  __m512i dots[G];
  group_dots<NT, G>(st.q + h, chunk, dots);
  const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1);
  const __m512 k_scale = _mm512_load_ps(chunk.k_scale), v_scale = _mm512_load_ps(chunk.v_scale);
  alignas(64) uint32_t w[G][kChunk / 2];
  __m512 w_step[G], correction[G];
  for (int g = 0; g < G; ++g) {
    __m512 x = _mm512_mul_ps(_mm512_cvtepi32_ps(dots[g]), _mm512_mul_ps(k_scale, st.q_step[h + g]));
    x = _mm512_mask_mov_ps(_mm512_set1_ps(-1e30f), valid, x);
    const __m512 new_max = _mm512_max_ps(st.row_max[h + g], ember_simd::broadcast_max(x));
    const __m512 p = ember_simd::exp2_512(_mm512_sub_ps(x, new_max));
    correction[g] = ember_simd::exp2_512(_mm512_sub_ps(st.row_max[h + g], new_max));
    st.row_sum[h + g] = _mm512_fmadd_ps(st.row_sum[h + g], correction[g], p);
    st.row_max[h + g] = new_max;
    const __m512 weight = _mm512_mul_ps(p, v_scale);
    const __m512 largest = _mm512_max_ps(ember_simd::broadcast_max(weight), _mm512_set1_ps(1e-30f));  // no 0 / 0
    w_step[g] = _mm512_div_ps(largest, _mm512_set1_ps(kInt16Max));
    const __m512i codes = _mm512_cvtps_epi32(_mm512_mul_ps(weight, _mm512_div_ps(_mm512_set1_ps(kInt16Max), largest)));
    _mm256_store_si256(reinterpret_cast<__m256i*>(w[g]), _mm512_cvtepi32_epi16(codes));
  }
  group_values<NT, G>(w, chunk, (n + 1) / 2, w_step, correction, st.acc + h);
}

// acc * inv in natural channel order (see group_values), times V's per-channel scales if any,
// rounded to bfloat16.
template <int NT>
inline void store_int8_head(const __m512* acc, float inv, const float* v_channel_scales, at::BFloat16* dst) {
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
  const __m512 scale = _mm512_set1_ps(inv);
  for (int half = 0; half < 2 * NT; ++half) {
    const __m512 a = acc[2 * half], b = acc[2 * half + 1];
    for (int part = 0; part < 2; ++part) {
      __m512 o = _mm512_mul_ps(_mm512_permutex2var_ps(a, part == 0 ? first : second, b), scale);
      const int64_t channel = 32 * half + 16 * part;
      if (v_channel_scales != nullptr) o = _mm512_mul_ps(o, _mm512_loadu_ps(v_channel_scales + channel));
      ember_simd::store_bf16x16(dst + channel, ember_simd::round_bf16(o));
    }
  }
}

// One sequence, bfloat16 queries, AVX-512 VNNI, head_dim = 64 * NT, no residuals. Positions go in
// chunks of 16; per chunk and KV head, every K and V row is widened to int16 once and serves the
// group's query heads in tiles of up to kHeadTile. Integer dot products replace the widening of
// every code to float: K against the int16 query, and V against int16 softmax weights.
template <int NT>
void decode_seq_int8_vnni(const at::BFloat16* q, const Int8Rows& k, const Int8Rows& v, const int64_t* table,
                          int64_t seq_len, int64_t block_size, int64_t num_kv_heads, int64_t group, float scale,
                          at::BFloat16* out) {
  constexpr int kHeadDim = 64 * NT;
  const int64_t num_heads = num_kv_heads * group;
  Int8SeqState<NT> st;
  const __m512 q_scale = _mm512_set1_ps(scale * 1.44269504f);  // base-2 softmax
  for (int64_t h = 0; h < num_heads; ++h) {
    const float* ks = k.per_token ? nullptr : k.scales + (h / group) * kHeadDim;
    __m512 qf[4 * NT];
    __m512 largest = _mm512_setzero_ps();
    for (int j = 0; j < 4 * NT; ++j) {
      qf[j] = _mm512_mul_ps(ember_simd::load_bf16x16(q + h * kHeadDim + 16 * j), q_scale);
      if (ks != nullptr) qf[j] = _mm512_mul_ps(qf[j], _mm512_loadu_ps(ks + 16 * j));
      largest = _mm512_max_ps(largest, _mm512_abs_ps(qf[j]));
    }
    const float top = _mm512_reduce_max_ps(largest);
    st.q_step[h] = _mm512_set1_ps(top > 0.f ? top / kInt16Max : 0.f);
    const __m512 inv_step = _mm512_set1_ps(top > 0.f ? kInt16Max / top : 0.f);
    for (int j = 0; j < 2 * NT; ++j) st.q[h][j] = to_int16(qf[2 * j], qf[2 * j + 1], inv_step);
    for (int j = 0; j < 4 * NT; ++j) st.acc[h][j] = _mm512_setzero_ps();
    st.row_max[h] = _mm512_set1_ps(-1e30f);  // finite: the build uses -ffast-math
    st.row_sum[h] = _mm512_setzero_ps();
  }
  Int8Chunk chunk;
  int64_t rows[2][kChunk];  // [slot, kv head 0] row of each position: this chunk's and the next one's
  const auto chunk_rows = [&](int64_t start, int64_t* out_rows) {
    const int count = static_cast<int>(std::clamp<int64_t>(seq_len - start, 0, kChunk));
    for (int t = 0; t < count; ++t) {
      const int64_t pos = start + t;
      out_rows[t] = (table[pos / block_size] * block_size + pos % block_size) * num_kv_heads;
    }
    return count;
  };
  chunk_rows(0, rows[0]);
  for (int64_t start = 0, c = 0; start < seq_len; start += kChunk, c ^= 1) {
    const int n = static_cast<int>(std::min<int64_t>(kChunk, seq_len - start));
    const int next_n = chunk_rows(start + kChunk, rows[c ^ 1]);
    const int64_t* here = rows[c];
    for (int64_t kv = 0; kv < num_kv_heads; ++kv) {
      for (int t = 0; t < kChunk; ++t) {
        const int64_t row = here[t] + kv;
        chunk.k[t] = t < n ? k.codes + row * kHeadDim : kZeroCodes;
        chunk.v[t] = t < n ? v.codes + row * kHeadDim : kZeroCodes;
        chunk.k_scale[t] = t < n && k.per_token ? k.scales[row] : 1.f;
        chunk.v_scale[t] = t < n && v.per_token ? v.scales[row] : 1.f;
      }
      // The next chunk's rows of this KV head into L2 while this one is computed (blocks sit where
      // the hardware prefetcher cannot guess), as the bf16 kernel does.
      for (int t = 0; t < next_n; ++t) {
        const int64_t offset = (rows[c ^ 1][t] + kv) * kHeadDim;
        for (int byte = 0; byte < kHeadDim; byte += 64) {
          _mm_prefetch(reinterpret_cast<const char*>(k.codes + offset + byte), _MM_HINT_T1);
          _mm_prefetch(reinterpret_cast<const char*>(v.codes + offset + byte), _MM_HINT_T1);
        }
      }
      static_assert(kHeadTile == 3, "the switch below covers tiles of 1-3 heads");
      for (int64_t g = 0; g < group; g += kHeadTile) {
        const int64_t h = kv * group + g;
        switch (std::min<int64_t>(group - g, kHeadTile)) {
          case 3: attend_int8_heads<NT, 3>(st, h, chunk, n); break;
          case 2: attend_int8_heads<NT, 2>(st, h, chunk, n); break;
          default: attend_int8_heads<NT, 1>(st, h, chunk, n);
        }
      }
    }
  }
  for (int64_t h = 0; h < num_heads; ++h) {
    const float* vs = v.per_token ? nullptr : v.scales + (h / group) * kHeadDim;
    const float sum = _mm512_reduce_add_ps(st.row_sum[h]);
    store_int8_head<NT>(st.acc[h], sum > 0.f ? 1.f / sum : 0.f, vs, out + h * kHeadDim);
  }
}

using DecodeSeqInt8Fn = decltype(&decode_seq_int8_vnni<1>);

template <int... I>
constexpr std::array<DecodeSeqInt8Fn, sizeof...(I)> int8_seq_table(std::integer_sequence<int, I...>) {
  return {&decode_seq_int8_vnni<I + 1>...};
}
constexpr auto kDecodeSeqInt8Fns = int8_seq_table(std::make_integer_sequence<int, kMaxTiles>{});  // by head_dim / 64 - 1
#endif

void check_rows(const torch::Tensor& codes, const torch::Tensor& scales, const torch::Tensor& res_index,
                const torch::Tensor& res_codes, const torch::Tensor& res_scales, const char* name) {
  TORCH_CHECK(codes.dim() == 4 && codes.scalar_type() == torch::kInt8 && codes.is_contiguous(),
              name, " codes must be contiguous int8 [B, bs, KVH, D]");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat32 && scales.is_contiguous(), name, " scales must be contiguous float32");
  const bool per_token = scales.dim() == 3 && scales.size(0) == codes.size(0) && scales.size(1) == codes.size(1) &&
                         scales.size(2) == codes.size(2);
  const bool per_channel = scales.dim() == 2 && scales.size(0) == codes.size(2) && scales.size(1) == codes.size(3);
  TORCH_CHECK(per_token || per_channel, name, " scales must be [B, bs, KVH] or [KVH, D]");
  if (res_index.numel() > 0) {
    TORCH_CHECK(res_index.scalar_type() == torch::kInt32 && res_index.numel() == codes.size(0) * codes.size(1),
                name, " residual index must be int32 [B * bs]");
    TORCH_CHECK(res_codes.scalar_type() == torch::kUInt8 && res_codes.dim() == 3 && res_codes.size(1) == codes.size(2) &&
                res_codes.size(2) * 2 == codes.size(3) && res_codes.is_contiguous(), name, " residual codes must be uint8 [R, KVH, D / 2]");
    TORCH_CHECK(res_scales.scalar_type() == torch::kFloat32 && res_scales.is_contiguous() &&
                res_scales.numel() == res_codes.size(0) * res_codes.size(1), name, " residual scales must be float32 [R, KVH]");
  }
}

}  // namespace

// q: [N, H, D] float32 or bfloat16; {k,v}_codes: [B, bs, KVH, D] int8 with {k,v}_scales [B, bs, KVH]
// (per token) or [KVH, D] (per channel); residuals as in Int8Rows (empty tensors: none); block_tables:
// [N, max_blocks]; seq_lens: [N] (the new token included). Returns [N, H, D] in q's dtype.
torch::Tensor paged_decode_attention_int8(torch::Tensor q, torch::Tensor k_codes, torch::Tensor k_scales,
                                          torch::Tensor k_res_index, torch::Tensor k_res_codes, torch::Tensor k_res_scales,
                                          torch::Tensor v_codes, torch::Tensor v_scales, torch::Tensor v_res_index,
                                          torch::Tensor v_res_codes, torch::Tensor v_res_scales, torch::Tensor block_tables,
                                          torch::Tensor seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3, "q must be [N, H, D]");
  check_rows(k_codes, k_scales, k_res_index, k_res_codes, k_res_scales, "key");
  check_rows(v_codes, v_scales, v_res_index, v_res_codes, v_res_scales, "value");
  TORCH_CHECK(k_codes.sizes() == v_codes.sizes(), "key and value codes must have one shape");
  TORCH_CHECK(q.size(2) == k_codes.size(3) && q.size(1) % k_codes.size(2) == 0,
              "q must have the cache's head_dim and a multiple of its KV heads");
  q = q.contiguous();
  block_tables = block_tables.to(torch::kInt64).contiguous();
  seq_lens = seq_lens.to(torch::kInt64).contiguous();
  auto out = torch::empty_like(q);
  const Int8Rows k = rows_of(k_codes, k_scales, k_res_index, k_res_codes, k_res_scales);
  const Int8Rows v = rows_of(v_codes, v_scales, v_res_index, v_res_codes, v_res_scales);
  const int64_t block_size = k_codes.size(1), num_kv_heads = k_codes.size(2);
  if (q.scalar_type() == torch::kFloat32) {
    decode_int8_kernel<float>(q, k, v, block_size, num_kv_heads, block_tables, seq_lens, scale, out);
  } else if (q.scalar_type() == torch::kBFloat16) {
#ifdef EMBER_HAS_INT8_VNNI
    const int64_t heads = q.size(1), head_dim = q.size(2);
    if (k.res_index == nullptr && v.res_index == nullptr && head_dim % 64 == 0 && head_dim <= 64 * kMaxTiles &&
        heads <= kMaxHeads) {
      const DecodeSeqInt8Fn decode_seq = kDecodeSeqInt8Fns[head_dim / 64 - 1];
      const int64_t max_blocks = block_tables.size(1), group = heads / num_kv_heads;
      const auto* qp = q.data_ptr<at::BFloat16>();
      auto* op = out.data_ptr<at::BFloat16>();
      const auto* tp = block_tables.data_ptr<int64_t>();
      const auto* lp = seq_lens.data_ptr<int64_t>();
      at::parallel_for(0, q.size(0), 1, [&](int64_t begin, int64_t end) {
        for (int64_t s = begin; s < end; ++s) {
          decode_seq(qp + s * heads * head_dim, k, v, tp + s * max_blocks, std::min(lp[s], max_blocks * block_size),
                     block_size, num_kv_heads, group, static_cast<float>(scale), op + s * heads * head_dim);
        }
      });
      return out;
    }
#endif
    decode_int8_kernel<at::BFloat16>(q, k, v, block_size, num_kv_heads, block_tables, seq_lens, scale, out);
  } else {
    TORCH_CHECK(false, "paged_decode_attention_int8 supports float32 and bfloat16 queries");
  }
  return out;
}

void register_paged_decode_int8(pybind11::module& m) {
  m.def("paged_decode_attention_int8", &paged_decode_attention_int8, "decode attention over an int8 paged KV cache");
}
