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


#if defined(__AVX512F__)
#include <immintrin.h>
#define EMBER_HAS_AVX512 1

// 16 bfloat16 values -> 16 floats (bf16 is the high half of an fp32).
inline __m512 load_bf16x16(const at::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

constexpr int kMaxVecs = 16;   // head_dim up to 256
constexpr int kMaxHeads = 32;  // query heads per sequence

// One sequence, bfloat16, AVX-512. A block's rows hold every KV head side by side, so each row is
// read once, start to end, for all heads (sequential memory traffic); each widened K/V slice
// serves every query head of its group. Accumulators live in L1-resident arrays.
void decode_seq_bf16_avx512(const at::BFloat16* q, const at::BFloat16* k_ptr, const at::BFloat16* v_ptr,
                            const int64_t* table, int64_t seq_len, int64_t block_size, int64_t num_kv_heads,
                            int64_t group, int64_t head_dim, float scale, at::BFloat16* out) {
  const int nv = static_cast<int>(head_dim / 16);
  const int64_t num_heads = num_kv_heads * group;
  const int64_t token_stride = num_kv_heads * head_dim;
  const int64_t block_stride = block_size * token_stride;
  const int64_t num_blocks = (seq_len + block_size - 1) / block_size;
  std::vector<float> scores(num_heads * block_size);
  alignas(64) __m512 qv[kMaxHeads][kMaxVecs];
  alignas(64) __m512 acc[kMaxHeads][kMaxVecs];
  float row_max[kMaxHeads], row_sum[kMaxHeads];
  for (int64_t h = 0; h < num_heads; ++h) {
    for (int i = 0; i < nv; ++i) {
      qv[h][i] = _mm512_mul_ps(load_bf16x16(q + h * head_dim + 16 * i), _mm512_set1_ps(scale));
      acc[h][i] = _mm512_setzero_ps();
    }
    row_max[h] = -1e30f;
    row_sum[h] = 0.f;
  }
  for (int64_t b = 0; b < num_blocks; ++b) {
    const int64_t n = std::min(block_size, seq_len - b * block_size);
    const at::BFloat16* kb = k_ptr + table[b] * block_stride;
    const at::BFloat16* vb = v_ptr + table[b] * block_stride;
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t kv = 0; kv < num_kv_heads; ++kv) {
        const at::BFloat16* krow = kb + t * token_stride + kv * head_dim;
        __m512 kvec[kMaxVecs];
        for (int i = 0; i < nv; ++i) kvec[i] = load_bf16x16(krow + 16 * i);
        for (int64_t g = 0; g < group; ++g) {
          const int64_t h = kv * group + g;
          __m512 dot = _mm512_mul_ps(qv[h][0], kvec[0]);
          for (int i = 1; i < nv; ++i) dot = _mm512_fmadd_ps(qv[h][i], kvec[i], dot);
          scores[h * block_size + t] = _mm512_reduce_add_ps(dot);
        }
      }
    }
    for (int64_t h = 0; h < num_heads; ++h) {
      float* sh = scores.data() + h * block_size;
      float block_max = row_max[h];
      for (int64_t t = 0; t < n; ++t) block_max = std::max(block_max, sh[t]);
      float block_sum = 0.f;
#pragma omp simd reduction(+ : block_sum)
      for (int64_t t = 0; t < n; ++t) {
        sh[t] = std::exp(sh[t] - block_max);
        block_sum += sh[t];
      }
      const float correction = std::exp(row_max[h] - block_max);
      row_sum[h] = row_sum[h] * correction + block_sum;
      row_max[h] = block_max;
      const __m512 c = _mm512_set1_ps(correction);
      for (int i = 0; i < nv; ++i) acc[h][i] = _mm512_mul_ps(acc[h][i], c);
    }
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t kv = 0; kv < num_kv_heads; ++kv) {
        const at::BFloat16* vrow = vb + t * token_stride + kv * head_dim;
        __m512 vvec[kMaxVecs];
        for (int i = 0; i < nv; ++i) vvec[i] = load_bf16x16(vrow + 16 * i);
        for (int64_t g = 0; g < group; ++g) {
          const int64_t h = kv * group + g;
          const __m512 p = _mm512_set1_ps(scores[h * block_size + t]);
          for (int i = 0; i < nv; ++i) acc[h][i] = _mm512_fmadd_ps(p, vvec[i], acc[h][i]);
        }
      }
    }
  }
  for (int64_t h = 0; h < num_heads; ++h) {
    const float inv = row_sum[h] > 0.f ? 1.f / row_sum[h] : 0.f;
    alignas(64) float tmp[16];
    at::BFloat16* dst = out + h * head_dim;
    for (int i = 0; i < nv; ++i) {
      _mm512_store_ps(tmp, _mm512_mul_ps(acc[h][i], _mm512_set1_ps(inv)));
      for (int j = 0; j < 16; ++j) dst[16 * i + j] = static_cast<at::BFloat16>(tmp[j]);
    }
  }
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
      const int64_t num_seqs = q.size(0), max_blocks = block_tables.size(1);
      const auto* qp = q.data_ptr<at::BFloat16>();
      auto* op = out.data_ptr<at::BFloat16>();
      const auto* tp = block_tables.data_ptr<int64_t>();
      const auto* lp = seq_lens.data_ptr<int64_t>();
      const int64_t heads = q.size(1);
      at::parallel_for(0, num_seqs, 1, [&](int64_t begin, int64_t end) {
        for (int64_t s = begin; s < end; ++s) {
          decode_seq_bf16_avx512(qp + s * heads * head_dim, k_cache.data_ptr<at::BFloat16>(),
                                 v_cache.data_ptr<at::BFloat16>(), tp + s * max_blocks,
                                 std::min(lp[s], max_blocks * k_cache.size(1)), k_cache.size(1),
                                 k_cache.size(2), group, head_dim, static_cast<float>(scale),
                                 op + s * heads * head_dim);
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

void register_fused_ops(pybind11::module& m);  // fused_ops.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over a paged KV cache");
  register_fused_ops(m);
}
