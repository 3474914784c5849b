// Causal prefill attention of one prompt chunk straight over the paged KV cache, bfloat16 or int8 codes
// (flash-attention style: tiles of 16 keys, online softmax in float32), with AVX512-BF16 dot products for
// both products.
//
// PyTorch's CPU SDPA runs a 512-token prompt of SmolLM2 at ~55 GFLOP/s in bfloat16, a seventh of what the
// same cores give its linears; this kernel keeps both products in `vdpbf16ps`:
//   - K of each 16-key tile is repacked so that lane j of one vector holds key j's pair of dimensions
//     (2p, 2p+1); a query row's pair broadcast against it gives 16 scores per instruction;
//   - V of each tile is repacked so that lane d holds dimension d of two neighbouring keys; the pair of
//     their softmax weights (rounded to bfloat16, as PyTorch's flash kernel rounds P before P V)
//     broadcast against it accumulates 16 output dimensions per instruction.
// Two tiles make one online-softmax step: one maximum and one rescale per 32 keys (those fixed costs, not
// the products, bound the loop). The repack is made once per call for every KV head and tile, then shared
// by every query row. A task is one KV head and 16 query positions (all query heads of that KV head: GQA
// rows share K/V); tasks are ordered short and long alternately so that a static split of the causal
// triangle is balanced.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <array>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>

#include "simd_bf16.h"
#define EMBER_PREFILL_AVX512 1
#endif

namespace {

#ifdef EMBER_PREFILL_AVX512
constexpr int64_t kTile = 16;      // keys per tile (one vector of scores)
constexpr int64_t kQueries = 16;   // query positions per task
constexpr int kRowBlock = 4;       // query rows scored together against one loaded K vector
constexpr int kMaxVecs = 16;       // head_dim <= 256

struct Problem {
  const uint16_t* q;               // [n, H, D] with strides token_stride, head_stride (elements)
  int64_t token_stride, head_stride;
  const uint32_t* k_tiles;         // [KVH, tiles, D / 2, 16] key pairs
  const uint32_t* v_tiles;         // [KVH, tiles, 8 key pairs, D]: each uint32 one dimension of two keys
  uint16_t* out;                   // [n, H, D] contiguous
  int64_t n, heads, kv_heads, context, tiles;
  float scale_log2;                // scale * log2(e): scores in base 2
};

// Lanes of tile `key0` that a query at position `limit` (its own key included) sees.
inline __mmask16 visible(int64_t key0, int64_t limit) {
  const int64_t count = limit - key0 + 1;
  return count >= kTile ? __mmask16(0xFFFF) : count <= 0 ? __mmask16(0) : __mmask16((1u << count) - 1);
}

// Output rows one pass of P V updates (16 accumulators: they share every V vector they load).
constexpr int pv_rows(int nv) { return nv >= 16 ? 1 : nv >= 8 ? 2 : 4; }

template <int NV>
void run_task(const Problem& p, int64_t g, int64_t block, std::vector<float>& state) {
  constexpr int64_t D = 16 * NV, pairs = D / 2;
  constexpr int kPv = pv_rows(NV);
  const int64_t group = p.heads / p.kv_heads;
  const int64_t i0 = block * kQueries, i1 = std::min(i0 + kQueries, p.n);
  const int64_t rows = (i1 - i0) * group;
  const int64_t padded = (rows + kRowBlock - 1) / kRowBlock * kRowBlock;
  state.assign(padded * (D + 16 + 1), 0.f);
  float* o = state.data();                 // [rows, D] unnormalised outputs
  float* lsum = o + padded * D;            // [rows, 16] running sums, lane by lane
  float* m = lsum + padded * 16;           // running max (base 2)
  std::fill(m, m + padded, -FLT_MAX);
  std::vector<const uint16_t*> qrow(padded);
  std::vector<int64_t> limit(padded);
  for (int64_t r = 0; r < padded; ++r) {
    const int64_t rr = std::min(r, rows - 1);  // padding rows repeat the last row; never written out
    const int64_t i = i0 + rr / group, h = g * group + rr % group;
    qrow[r] = p.q + i * p.token_stride + h * p.head_stride;
    limit[r] = p.context + i;
  }
  const int64_t last_tile = (p.context + i1 - 1) / kTile;
  alignas(64) uint32_t weights[kRowBlock][kTile];  // two tiles' pairs of bfloat16 probabilities
  alignas(64) float m_old[16], m_new[16];
  // Tiles go two at a time: one maximum, one rescale of O and of the sums per 32 keys (the online
  // softmax's fixed costs, which bound the loop, halved), and 8 independent chains of scores.
  for (int64_t t = 0; t <= last_tile; t += 2) {
    const int64_t key0 = t * kTile, key1 = key0 + kTile;
    const bool pair_of_tiles = t + 1 <= last_tile;
    const uint32_t* kt0 = p.k_tiles + ((g * p.tiles + t) * pairs) * kTile;
    const uint32_t* kt1 = kt0 + pairs * kTile;
    const uint32_t* vt0 = p.v_tiles + ((g * p.tiles + t) * (kTile / 2)) * D;
    const uint32_t* vt1 = vt0 + (kTile / 2) * D;
    for (int64_t r0 = 0; r0 < padded; r0 += kRowBlock) {
      if (visible(key0, limit[r0 + kRowBlock - 1]) == 0) continue;  // later rows see at least as much
      const bool second = pair_of_tiles && visible(key1, limit[r0 + kRowBlock - 1]) != 0;
      __m512 acc0[kRowBlock], acc1[kRowBlock];
      for (int rr = 0; rr < kRowBlock; ++rr) acc0[rr] = acc1[rr] = _mm512_setzero_ps();
      const auto score = [&](auto both) {  // both tiles, or the first alone (decided at compile time)
        for (int64_t pp = 0; pp < pairs; ++pp) {
          const __m512bh keys0 = (__m512bh)_mm512_loadu_si512(kt0 + pp * kTile);
          __m512bh keys1;
          if constexpr (both) keys1 = (__m512bh)_mm512_loadu_si512(kt1 + pp * kTile);
          for (int rr = 0; rr < kRowBlock; ++rr) {
            int32_t pair;
            std::memcpy(&pair, qrow[r0 + rr] + 2 * pp, sizeof(pair));
            const __m512bh query = (__m512bh)_mm512_set1_epi32(pair);
            acc0[rr] = _mm512_dpbf16_ps(acc0[rr], query, keys0);
            if constexpr (both) acc1[rr] = _mm512_dpbf16_ps(acc1[rr], query, keys1);
          }
        }
      };
      if (second) score(std::true_type{});
      else score(std::false_type{});
      // online softmax of the block's rows over both tiles: new maxima, one vector exp2 for the four
      // rescale factors
      __mmask16 seen0[kRowBlock], seen1[kRowBlock];
      __m512 s0[kRowBlock], s1[kRowBlock];
      const __m512 lowest = _mm512_set1_ps(-FLT_MAX);
      for (int rr = 0; rr < kRowBlock; ++rr) {
        const int64_t r = r0 + rr;
        seen0[rr] = visible(key0, limit[r]);
        seen1[rr] = second ? visible(key1, limit[r]) : __mmask16(0);
        s0[rr] = _mm512_mul_ps(acc0[rr], _mm512_set1_ps(p.scale_log2));
        s1[rr] = _mm512_mul_ps(acc1[rr], _mm512_set1_ps(p.scale_log2));
        const __m512 both = _mm512_max_ps(_mm512_mask_mov_ps(lowest, seen0[rr], s0[rr]),
                                          _mm512_mask_mov_ps(lowest, seen1[rr], s1[rr]));
        m_old[rr] = m[r];
        m_new[rr] = seen0[rr] ? std::max(m[r], _mm512_reduce_max_ps(both)) : m[r];
        m[r] = m_new[rr];
      }
      alignas(64) float alpha[16];
      _mm512_store_ps(alpha, ember_simd::exp2_512(_mm512_sub_ps(_mm512_maskz_loadu_ps(0xF, m_old),
                                                                _mm512_maskz_loadu_ps(0xF, m_new))));
      for (int rr = 0; rr < kRowBlock; ++rr) {
        const __m512 top = _mm512_set1_ps(m_new[rr]);  // hidden lanes: 2^0, then zeroed
        const __m512 e0 = _mm512_maskz_mov_ps(seen0[rr], ember_simd::exp2_512(
                                                             _mm512_sub_ps(_mm512_mask_mov_ps(top, seen0[rr], s0[rr]), top)));
        const __m512 e1 = _mm512_maskz_mov_ps(seen1[rr], ember_simd::exp2_512(
                                                             _mm512_sub_ps(_mm512_mask_mov_ps(top, seen1[rr], s1[rr]), top)));
        float* ls = lsum + (r0 + rr) * 16;
        _mm512_storeu_ps(ls, _mm512_add_ps(_mm512_fmadd_ps(_mm512_loadu_ps(ls), _mm512_set1_ps(alpha[rr]), e0), e1));
        _mm256_store_si256(reinterpret_cast<__m256i*>(weights[rr]), (__m256i)_mm512_cvtneps_pbh(e0));
        _mm256_store_si256(reinterpret_cast<__m256i*>(weights[rr] + kTile / 2), (__m256i)_mm512_cvtneps_pbh(e1));
      }
      // O = O * alpha + P V, kPv rows at a time sharing each loaded V vector
      for (int r1 = 0; r1 < kRowBlock; r1 += kPv) {
        __m512 acc_o[kPv][NV];
        for (int rr = 0; rr < kPv; ++rr) {
          const __m512 a = _mm512_set1_ps(alpha[r1 + rr]);
          const float* orow = o + (r0 + r1 + rr) * D;
          for (int v = 0; v < NV; ++v) acc_o[rr][v] = _mm512_mul_ps(_mm512_loadu_ps(orow + 16 * v), a);
        }
        for (int tile = 0; tile < 2; ++tile) {
          const __mmask16 last_seen = tile == 0 ? seen0[r1 + kPv - 1] : seen1[r1 + kPv - 1];
          const uint32_t* vt = tile == 0 ? vt0 : vt1;
          for (int64_t kp = 0; kp < kTile / 2; ++kp) {
            if (!(last_seen >> (2 * kp) & 3)) break;  // visible lanes are a prefix; the last row sees most
            __m512bh w[kPv];
            for (int rr = 0; rr < kPv; ++rr)
              w[rr] = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(weights[r1 + rr][tile * (kTile / 2) + kp]));
            const uint32_t* vrow = vt + kp * D;
            for (int v = 0; v < NV; ++v) {
              const __m512bh values = (__m512bh)_mm512_loadu_si512(vrow + 16 * v);
              for (int rr = 0; rr < kPv; ++rr) acc_o[rr][v] = _mm512_dpbf16_ps(acc_o[rr][v], w[rr], values);
            }
          }
        }
        for (int rr = 0; rr < kPv; ++rr)
          for (int v = 0; v < NV; ++v) _mm512_storeu_ps(o + (r0 + r1 + rr) * D + 16 * v, acc_o[rr][v]);
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r / group, h = g * group + r % group;
    uint16_t* dst = p.out + (i * p.heads + h) * D;
    const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(_mm512_loadu_ps(lsum + r * 16)));
    for (int v = 0; v < NV; ++v)
      ember_simd::store_bf16x16(dst + 16 * v, ember_simd::round_bf16(_mm512_mul_ps(_mm512_loadu_ps(o + r * D + 16 * v), inv)));
  }
}

using TaskFn = void (*)(const Problem&, int64_t, int64_t, std::vector<float>&);

template <int... NV>
constexpr std::array<TaskFn, sizeof...(NV)> task_fns(std::integer_sequence<int, NV...>) {
  return {&run_task<NV + 1>...};
}
constexpr auto kTaskFns = task_fns(std::make_integer_sequence<int, kMaxVecs>{});

// K and V rows of positions [0, rows) of one sequence, read through its block table, into the tile layouts.
// row(slot, kv_head, is_value, scratch) gives a position's bfloat16 row (the cache's own, or `scratch`
// filled with its dequantized codes).
template <typename Row>
void repack(const Row& row, const int64_t* table, int64_t block_size, int64_t kv_heads, int64_t dim, int64_t rows,
            int64_t tiles, uint32_t* k_tiles, uint32_t* v_tiles) {
  const int64_t pairs = dim / 2;
  at::parallel_for(0, kv_heads * tiles, 4, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> scratch(2 * dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / tiles, t = task % tiles;
      uint32_t* kt = k_tiles + task * pairs * kTile;
      uint32_t* vt = v_tiles + task * (kTile / 2) * dim;
      for (int64_t j = 0; j < kTile; ++j) {
        const int64_t pos = t * kTile + j;
        const uint16_t* krow = nullptr;
        const uint16_t* vrow = nullptr;
        if (pos < rows) {
          const int64_t slot = table[pos / block_size] * block_size + pos % block_size;
          krow = row(slot, g, false, scratch.data());
          vrow = row(slot, g, true, scratch.data() + dim);
        }
        for (int64_t pp = 0; pp < pairs; ++pp) {
          uint32_t pair = 0;
          if (krow) std::memcpy(&pair, krow + 2 * pp, sizeof(pair));
          kt[pp * kTile + j] = pair;
        }
        auto* vdst = reinterpret_cast<uint16_t*>(vt + (j / 2) * dim);
        for (int64_t d = 0; d < dim; ++d) vdst[2 * d + (j % 2)] = vrow ? vrow[d] : 0;
      }
    }
  });
}
#endif

void check_queries(const torch::Tensor& q, int64_t kv_heads, int64_t dim) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kBFloat16 && q.stride(2) == 1,
              "q must be bfloat16 [n, H, D] with contiguous rows");
  TORCH_CHECK(q.size(2) == dim && q.size(1) % kv_heads == 0, "head_dim and heads must match the caches");
  TORCH_CHECK(dim % 16 == 0 && dim <= 256, "head_dim must be a multiple of 16, at most 256");
}

// The attention of q over the rows `row` gives (see repack), for either cache.
template <typename Row>
torch::Tensor prefill_over(const torch::Tensor& q, int64_t kv_heads, int64_t block_size, torch::Tensor block_table,
                           int64_t context, double scale, const Row& row) {
  const int64_t n = q.size(0), heads = q.size(1), dim = q.size(2), rows = context + n;
  block_table = block_table.to(torch::kInt64).contiguous();
  TORCH_CHECK(block_table.numel() * block_size >= rows, "block_table is too short for context + n rows");
  auto out = torch::empty({n, heads, dim}, q.options());
#ifdef EMBER_PREFILL_AVX512
  if (n == 0) return out;
  const int64_t tiles = (rows + kTile - 1) / kTile;
  auto k_tiles = torch::empty({kv_heads * tiles * (dim / 2) * kTile}, torch::kInt32);
  auto v_tiles = torch::empty({kv_heads * tiles * (kTile / 2) * dim}, torch::kInt32);
  auto* ktp = reinterpret_cast<uint32_t*>(k_tiles.data_ptr<int32_t>());
  auto* vtp = reinterpret_cast<uint32_t*>(v_tiles.data_ptr<int32_t>());
  repack(row, block_table.data_ptr<int64_t>(), block_size, kv_heads, dim, rows, tiles, ktp, vtp);
  const Problem p{reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>()), q.stride(0), q.stride(1), ktp, vtp,
                  reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()), n, heads, kv_heads, context, tiles,
                  static_cast<float>(scale * 1.4426950408889634)};
  const TaskFn task = kTaskFns[dim / 16 - 1];
  const int64_t blocks = (n + kQueries - 1) / kQueries, tasks = kv_heads * blocks;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> state;
    for (int64_t index = begin; index < end; ++index) {
      const int64_t g = index % kv_heads, k = index / kv_heads;
      const int64_t block = k % 2 == 0 ? k / 2 : blocks - 1 - k / 2;  // short and long alternately
      task(p, g, block, state);
    }
  });
#else
  TORCH_CHECK(false, "paged_prefill_attention needs AVX512-BF16");
#endif
  return out;
}

}  // namespace

// q: [n, H, D] bfloat16 (last dim contiguous), the chunk's queries at positions context .. context + n - 1;
// caches: [num_blocks, block_size, KVH, D] with the chunk's K/V already written; block_table: [>= blocks
// of context + n] int64. Returns [n, H, D]: each query over the keys at positions <= its own.
torch::Tensor paged_prefill_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                      torch::Tensor block_table, int64_t context, double scale) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.scalar_type() == torch::kBFloat16 && v_cache.sizes() == k_cache.sizes() &&
                  v_cache.scalar_type() == torch::kBFloat16 && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "caches must be contiguous bfloat16 [B, bs, KVH, D]");
  const int64_t kv_heads = k_cache.size(2), dim = k_cache.size(3);
  check_queries(q, kv_heads, dim);
  const auto* kp = reinterpret_cast<const uint16_t*>(k_cache.data_ptr<at::BFloat16>());
  const auto* vp = reinterpret_cast<const uint16_t*>(v_cache.data_ptr<at::BFloat16>());
  return prefill_over(q, kv_heads, k_cache.size(1), block_table, context, scale,
                      [&](int64_t slot, int64_t g, bool value, uint16_t*) {
                        return (value ? vp : kp) + (slot * kv_heads + g) * dim;
                      });
}

// The same over an int8 cache: codes [num_blocks, block_size, KVH, D] with per-token scales [num_blocks,
// block_size, KVH] or per-channel ones [KVH, D]. Each row is dequantized (code * scale in float32, rounded to
// bfloat16, as the cache's read() gives SDPA) into the tiles.
torch::Tensor paged_prefill_attention_int8(torch::Tensor q, torch::Tensor k_codes, torch::Tensor k_scales,
                                           torch::Tensor v_codes, torch::Tensor v_scales, torch::Tensor block_table,
                                           int64_t context, double scale) {
  TORCH_CHECK(k_codes.dim() == 4 && k_codes.scalar_type() == torch::kInt8 && v_codes.sizes() == k_codes.sizes() &&
                  v_codes.scalar_type() == torch::kInt8 && k_codes.is_contiguous() && v_codes.is_contiguous(),
              "codes must be contiguous int8 [B, bs, KVH, D]");
  const int64_t kv_heads = k_codes.size(2), dim = k_codes.size(3);
  const bool per_token = k_scales.dim() == 3;
  for (const auto* s : {&k_scales, &v_scales})
    TORCH_CHECK(s->scalar_type() == torch::kFloat32 && s->is_contiguous() &&
                    (per_token ? s->sizes() == k_codes.sizes().slice(0, 3) : (s->dim() == 2 && s->size(0) == kv_heads &&
                                                                            s->size(1) == dim)),
                "scales must be float32 [B, bs, KVH] (per token) or [KVH, D] (per channel), both alike");
  check_queries(q, kv_heads, dim);
  const int8_t* codes[2] = {k_codes.data_ptr<int8_t>(), v_codes.data_ptr<int8_t>()};
  const float* scales[2] = {k_scales.data_ptr<float>(), v_scales.data_ptr<float>()};
  return prefill_over(q, kv_heads, k_codes.size(1), block_table, context, scale,
                      [&](int64_t slot, int64_t g, bool value, uint16_t* scratch) {
                        const int8_t* c = codes[value] + (slot * kv_heads + g) * dim;
                        auto* out = reinterpret_cast<at::BFloat16*>(scratch);
                        if (per_token) {
                          const float s = scales[value][slot * kv_heads + g];
                          for (int64_t d = 0; d < dim; ++d) out[d] = static_cast<at::BFloat16>(c[d] * s);
                        } else {
                          const float* s = scales[value] + g * dim;
                          for (int64_t d = 0; d < dim; ++d) out[d] = static_cast<at::BFloat16>(c[d] * s[d]);
                        }
                        return static_cast<const uint16_t*>(scratch);
                      });
}

void register_paged_prefill(pybind11::module& m) {
  m.def("paged_prefill_attention", &paged_prefill_attention,
        "causal attention of one prompt chunk over its sequence's paged bfloat16 K/V (AVX512-BF16)");
  m.def("paged_prefill_attention_int8", &paged_prefill_attention_int8,
        "the same over an int8 cache's codes and per-token or per-channel scales");
}
