// Decode attention straight over the paged KV cache: one query token per row, keys and values read
// block by block through the block table (no gather), online softmax in float32. Rows that verify one
// sequence's speculative drafts share a pass over its keys (bfloat16, AVX-512; bit for bit the same).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "paged_decode_bf16.h"

namespace {

template <typename T>
inline float to_float(T x) { return static_cast<float>(x); }

template <typename T>
void decode_kernel(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                   const torch::Tensor& block_tables, const torch::Tensor& seq_lens, double scale,
                   torch::Tensor& out) {
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads;
  const int64_t max_blocks = block_tables.size(1);
  const T* q_ptr = q.data_ptr<T>();
  const T* k_ptr = k_cache.data_ptr<T>();
  const T* v_ptr = v_cache.data_ptr<T>();
  const int64_t* table_ptr = block_tables.data_ptr<int64_t>();
  const int64_t* len_ptr = seq_lens.data_ptr<int64_t>();
  T* out_ptr = out.data_ptr<T>();
  const int64_t token_stride = num_kv_heads * head_dim;  // between consecutive slots
  const int64_t block_stride = block_size * token_stride;
  const float fscale = static_cast<float>(scale);

  // One work item per sequence: a block's rows hold every KV head, so all heads are served
  // while the block is in L1.
  at::parallel_for(0, num_seqs, 1, [&](int64_t begin, int64_t end) {
    const int64_t rows = num_heads;  // one softmax row per query head
    std::vector<float> qf(rows * head_dim), acc(rows * head_dim), scores(block_size);
    std::vector<float> row_max(rows), row_sum(rows);
    for (int64_t seq = begin; seq < end; ++seq) {
      const int64_t seq_len = len_ptr[seq];
      const T* qs = q_ptr + seq * num_heads * head_dim;
      for (int64_t i = 0; i < rows * head_dim; ++i) qf[i] = to_float(qs[i]) * fscale;
      // A finite "minus infinity": the kernel is built with -ffast-math (vectorized expf).
      std::fill(row_max.begin(), row_max.end(), -1e30f);
      std::fill(row_sum.begin(), row_sum.end(), 0.f);
      std::fill(acc.begin(), acc.end(), 0.f);
      const int64_t num_blocks = std::min((seq_len + block_size - 1) / block_size, max_blocks);
      for (int64_t b = 0; b < num_blocks; ++b) {
        const int64_t block = table_ptr[seq * max_blocks + b];
        const int64_t n = std::min(block_size, seq_len - b * block_size);
        for (int64_t h = 0; h < num_heads; ++h) {
          const int64_t kv_head = h / group;
          const T* kb = k_ptr + block * block_stride + kv_head * head_dim;
          const T* vb = v_ptr + block * block_stride + kv_head * head_dim;
          const float* qh = qf.data() + h * head_dim;
          float block_max = row_max[h];
          for (int64_t t = 0; t < n; ++t) {
            const T* kt = kb + t * token_stride;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < head_dim; ++d) s += qh[d] * to_float(kt[d]);
            scores[t] = s;
            block_max = std::max(block_max, s);
          }
          // Rescale what was accumulated under the old maximum (online softmax).
          const float correction = std::exp(row_max[h] - block_max);
          float* ah = acc.data() + h * head_dim;
          row_sum[h] *= correction;
#pragma omp simd
          for (int64_t d = 0; d < head_dim; ++d) ah[d] *= correction;
          float* probs = scores.data();
          float block_sum = 0.f;
#pragma omp simd reduction(+ : block_sum)
          for (int64_t t = 0; t < n; ++t) {
            probs[t] = std::exp(probs[t] - block_max);
            block_sum += probs[t];
          }
          row_sum[h] += block_sum;
          for (int64_t t = 0; t < n; ++t) {
            const float p = probs[t];
            const T* vt = vb + t * token_stride;
#pragma omp simd
            for (int64_t d = 0; d < head_dim; ++d) ah[d] += p * to_float(vt[d]);
          }
          row_max[h] = block_max;
        }
      }
      T* dst = out_ptr + seq * num_heads * head_dim;
      for (int64_t h = 0; h < num_heads; ++h) {
        const float inv = row_sum[h] > 0.f ? 1.f / row_sum[h] : 0.f;
        for (int64_t d = 0; d < head_dim; ++d) dst[h * head_dim + d] = static_cast<T>(acc[h * head_dim + d] * inv);
      }
    }
  });
}


#ifdef EMBER_HAS_AVX512
using namespace ember_decode;  // paged_decode_bf16.h

// One sequence, bfloat16, AVX-512, head_dim = 16 * NV. Positions go in chunks of 16 (one vector of
// scores each, whatever the block size); each chunk's K/V rows serve every head of their group
// while they sit in L1. Softmax and sums are float32.
template <int NV>
void decode_seq_bf16_avx512(const uint16_t* q, const uint16_t* k_ptr, const uint16_t* v_ptr, const int64_t* table,
                            int64_t seq_len, int64_t block_size, int64_t num_kv_heads, int64_t group, float scale,
                            uint16_t* out) {
  constexpr int kHeadDim = 16 * NV;
  const int64_t num_heads = num_kv_heads * group;
  SeqState<NV> st;
  for (int64_t h = 0; h < num_heads; ++h) start_head<NV>(st, h, q + h * kHeadDim, scale);
  const int64_t token_stride = num_kv_heads * kHeadDim;
  const auto chunk_len = [&](int64_t start) {
    return static_cast<int>(std::clamp<int64_t>(seq_len - start, 0, kChunk));
  };
  int64_t offsets[2][kChunk];  // this chunk's and the next one's, alternating
  chunk_offsets(table, 0, chunk_len(0), block_size, token_stride, offsets[0]);
  for (int64_t start = 0, c = 0; start < seq_len; start += kChunk, c ^= 1) {
    const int n = chunk_len(start), next_n = chunk_len(start + kChunk);
    chunk_offsets(table, start + kChunk, next_n, block_size, token_stride, offsets[c ^ 1]);
    attend_chunk<NV>(st, k_ptr, v_ptr, offsets[c], n, offsets[c ^ 1], next_n, num_kv_heads, group);
  }
  for (int64_t h = 0; h < num_heads; ++h) finish_head<NV>(st, h, out + h * kHeadDim);
}

// Rows that verify one sequence's drafts, KV head `kv` only: row r (of `rows`) attends to seq_lens[r] =
// seq_lens[0] + r positions over the same blocks (`table`, the last row's). Each chunk's K and V rows are
// widened once for the group's query heads of every row, where serving the rows one by one widens and
// loads them once per row. Per row and head the arithmetic is decode_seq_bf16_avx512's, operation for
// operation (a row's lanes past its own end are masked before they count), so the output is bit for bit
// the same. rows * group <= kMaxHeads.
template <int NV>
void decode_span_bf16_avx512(const uint16_t* q, const uint16_t* k_ptr, const uint16_t* v_ptr, const int64_t* table,
                             const int64_t* seq_lens, int64_t rows, int64_t kv, int64_t block_size,
                             int64_t num_kv_heads, int64_t group, float scale, uint16_t* out) {
  constexpr int kHeadDim = 16 * NV;
  const int64_t num_heads = num_kv_heads * group;
  SeqState<NV> st;  // slot r * group + g: query head kv * group + g of row r
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < group; ++g) start_head<NV>(st, r * group + g, q + (r * num_heads + kv * group + g) * kHeadDim, scale);
  const int64_t token_stride = num_kv_heads * kHeadDim, span_len = seq_lens[rows - 1];
  const uint16_t* k_head = k_ptr + kv * kHeadDim;
  const uint16_t* v_head = v_ptr + kv * kHeadDim;
  const auto clamp_len = [](int64_t len) { return static_cast<int>(std::clamp<int64_t>(len, 0, kChunk)); };
  WidenedRows<NV> chunk;
  int64_t offsets[2][kChunk];
  chunk_offsets(table, 0, clamp_len(span_len), block_size, token_stride, offsets[0]);
  for (int64_t start = 0, c = 0; start < span_len; start += kChunk, c ^= 1) {
    const int n = clamp_len(span_len - start), next_n = clamp_len(span_len - start - kChunk);
    chunk_offsets(table, start + kChunk, next_n, block_size, token_stride, offsets[c ^ 1]);
    for (int t = 0; t < kChunk; ++t) {
      for (int j = 0; j < NV; ++j) {
        chunk.k[t][j] = t < n ? widen<NV>(k_head + offsets[c][t], j) : _mm512_setzero_ps();
        chunk.v[t][j] = t < n ? widen<NV>(v_head + offsets[c][t], j) : _mm512_setzero_ps();
      }
      if (t < next_n) {
        prefetch_row<NV>(k_head + offsets[c ^ 1][t]);
        prefetch_row<NV>(v_head + offsets[c ^ 1][t]);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int n_row = clamp_len(seq_lens[r] - start);
      if (n_row > 0) attend_group<NV>(st, r * group, group, chunk, n_row);  // 0: the row ended before the chunk
    }
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < group; ++g) finish_head<NV>(st, r * group + g, out + (r * num_heads + kv * group + g) * kHeadDim);
}

using DecodeSeqFn = decltype(&decode_seq_bf16_avx512<1>);
using DecodeSpanFn = decltype(&decode_span_bf16_avx512<1>);

template <int... I>
constexpr std::array<DecodeSeqFn, sizeof...(I)> decode_seq_table(std::integer_sequence<int, I...>) {
  return {&decode_seq_bf16_avx512<I + 1>...};
}
template <int... I>
constexpr std::array<DecodeSpanFn, sizeof...(I)> decode_span_table(std::integer_sequence<int, I...>) {
  return {&decode_span_bf16_avx512<I + 1>...};
}
// Indexed by head_dim / 16 - 1.
constexpr auto kDecodeSeqFns = decode_seq_table(std::make_integer_sequence<int, kMaxVecs>{});
constexpr auto kDecodeSpanFns = decode_span_table(std::make_integer_sequence<int, kMaxVecs>{});

// What one thread runs: a row alone over every head (kv < 0), or rows [first, first + rows) of a
// verification span for one KV head.
struct WorkItem {
  int64_t first, rows, kv;
};

// The rows of a step cut into work items. Consecutive rows whose lengths go up by one over the same blocks
// are one sequence verifying drafts (or, with shared prefix blocks, rows that read the same keys, which
// is the same computation); they go in pieces of at most kMaxHeads / group rows per KV head, cut smaller
// when there are too few pieces to keep every thread busy.
std::vector<WorkItem> work_items(const int64_t* tables, const int64_t* lens, int64_t num_rows, int64_t max_blocks,
                                 int64_t block_size, int64_t num_kv_heads, int64_t group) {
  const auto continues = [&](int64_t a, int64_t b) {
    const int64_t len = lens[b], blocks = (len + block_size - 1) / block_size;
    return len == lens[a] + 1 && lens[a] >= 1 && blocks <= max_blocks &&
           std::equal(tables + b * max_blocks, tables + b * max_blocks + blocks, tables + a * max_blocks);
  };
  std::vector<std::pair<int64_t, int64_t>> spans;  // (first row, rows)
  int64_t multi = 0;
  for (int64_t row = 0; row < num_rows;) {
    int64_t end = row + 1;
    while (end < num_rows && continues(end - 1, end)) ++end;
    spans.emplace_back(row, end - row);
    multi += end - row > 1;
    row = end;
  }
  const int64_t max_rows = kMaxHeads / group;
  const int64_t wanted = 4 * at::get_num_threads();  // pieces of spans worth cutting smaller for
  const int64_t pieces = multi ? std::max<int64_t>(1, (wanted + multi * num_kv_heads - 1) / (multi * num_kv_heads)) : 1;
  std::vector<WorkItem> items;
  for (const auto& [first, rows] : spans) {
    if (rows == 1 || max_rows < 2) {
      for (int64_t row = first; row < first + rows; ++row) items.push_back({row, 1, -1});
      continue;
    }
    const int64_t piece = std::min(max_rows, std::max<int64_t>(1, (rows + pieces - 1) / pieces));
    for (int64_t kv = 0; kv < num_kv_heads; ++kv)
      for (int64_t row = first; row < first + rows; row += piece) items.push_back({row, std::min(piece, first + rows - row), kv});
  }
  return items;
}
#endif

}  // namespace

// q: [N, H, D]; caches: [num_blocks, block_size, KVH, D]; block_tables: [N, max_blocks] int64;
// seq_lens: [N] int64 (tokens to attend, the new one included). Returns [N, H, D].
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q must be [N, H, D] and caches [B, bs, KVH, D]");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && k_cache.scalar_type() == v_cache.scalar_type(),
              "q and caches must share a dtype");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "heads must be a multiple of KV heads");
  q = q.contiguous();
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  block_tables = block_tables.to(torch::kInt64).contiguous();
  seq_lens = seq_lens.to(torch::kInt64).contiguous();
  auto out = torch::empty_like(q);
  if (q.scalar_type() == torch::kFloat32) {
    decode_kernel<float>(q, k_cache, v_cache, block_tables, seq_lens, scale, out);
  } else if (q.scalar_type() == torch::kBFloat16) {
#ifdef EMBER_HAS_AVX512
    const int64_t head_dim = q.size(2), group = q.size(1) / k_cache.size(2);
    if (head_dim % 16 == 0 && head_dim <= 16 * kMaxVecs && q.size(1) <= kMaxHeads) {
      const DecodeSeqFn decode_seq = kDecodeSeqFns[head_dim / 16 - 1];
      const int64_t num_seqs = q.size(0), max_blocks = block_tables.size(1), heads = q.size(1);
      const int64_t block_size = k_cache.size(1);
      const auto* qp = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
      const auto* kp = reinterpret_cast<const uint16_t*>(k_cache.data_ptr<at::BFloat16>());
      const auto* vp = reinterpret_cast<const uint16_t*>(v_cache.data_ptr<at::BFloat16>());
      auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
      const auto* tp = block_tables.data_ptr<int64_t>();
      const auto* lp = seq_lens.data_ptr<int64_t>();
      const DecodeSpanFn decode_span = kDecodeSpanFns[head_dim / 16 - 1];
      const std::vector<WorkItem> items = work_items(tp, lp, num_seqs, max_blocks, block_size, k_cache.size(2), group);
      at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const auto [s, rows, kv] = items[i];
          if (kv < 0) {
            decode_seq(qp + s * heads * head_dim, kp, vp, tp + s * max_blocks,
                       std::min(lp[s], max_blocks * block_size), block_size, k_cache.size(2), group,
                       static_cast<float>(scale), op + s * heads * head_dim);
          } else {
            decode_span(qp + s * heads * head_dim, kp, vp, tp + (s + rows - 1) * max_blocks, lp + s, rows, kv,
                        block_size, k_cache.size(2), group, static_cast<float>(scale), op + s * heads * head_dim);
          }
        }
      });
      return out;
    }
#endif
    decode_kernel<at::BFloat16>(q, k_cache, v_cache, block_tables, seq_lens, scale, out);
  } else {
    TORCH_CHECK(false, "paged_decode_attention supports float32 and bfloat16");
  }
  return out;
}

void register_paged_decode(pybind11::module& m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over a paged KV cache");
}
