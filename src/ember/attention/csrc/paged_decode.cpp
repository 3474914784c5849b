// Decode attention straight over the paged KV cache: one query token per sequence, keys and
// values read block by block through the block table (no gather), online softmax in float32.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <limits>
#include <vector>

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
    decode_kernel<at::BFloat16>(q, k_cache, v_cache, block_tables, seq_lens, scale, out);
  } else {
    TORCH_CHECK(false, "paged_decode_attention supports float32 and bfloat16");
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over a paged KV cache");
}
