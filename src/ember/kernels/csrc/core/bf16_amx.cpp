// Dense bfloat16 linear on AMX-BF16 for short calls: y[M, N] = x[M, K] @ W[N, K]^T, W stored once in
// the VNNI B-tile order, float32 tile accumulators rounded once to bfloat16. At decode sizes it beats
// oneDNN's prepacked matmul, whose per-call overhead dominates a few-token call.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>

#include "amx.h"

#if defined(EMBER_AMX) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#define EMBER_BF16_AMX 1
#endif

namespace {

#ifdef EMBER_BF16_AMX
using ember_amx::kTileRows;
constexpr int64_t kTileK = 32;                      // bf16 k values per tile row
constexpr int64_t kTileBytes = kTileRows * 64;      // one B tile: 16 k pairs x 16 columns x 2 values

struct Problem {
  const at::BFloat16* x;     // [M, K]
  const at::BFloat16* tail;  // [32, K]: the last M % 32 rows, zero padded (null when M % 16 == 0)
  const uint8_t* w;          // [N / 16, K / 32, 16, 32] bf16 tiles
  at::BFloat16* y;           // [M, N]
  int64_t m, n, k;
};

void run_bf16(const Problem& p) {
  const ember_amx::TaskGrid grid(p.m, p.n);
  const int64_t k_tiles = p.k / kTileK;
  const ember_amx::Rows rows{reinterpret_cast<const uint8_t*>(p.x), reinterpret_cast<const uint8_t*>(p.tail),
                             p.k * 2};
  ember_amx::parallel_tasks(grid, [&](int64_t begin, int64_t end, void* acc_ptr) {
    const float* acc = static_cast<const float*>(acc_ptr);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t nb0 = grid.nb0(t), nbs = grid.nbs(t);
      const uint8_t* b0 = p.w + nb0 * k_tiles * kTileBytes;
      ember_amx::row_blocks<ember_amx::Dot::kBF16>(
          rows, grid.r0(t), grid.r1(t), b0, b0 + k_tiles * kTileBytes, kTileBytes, k_tiles, nbs, acc_ptr, [] {},
          [&](int64_t m0, int64_t n_rows) {
            for (int64_t r = 0; r < n_rows; ++r) {
              for (int64_t c = 0; c < nbs * 16; c += 16) {
                const __m256i v = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(acc + r * 32 + c));
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(p.y + (m0 + r) * p.n + nb0 * 16 + c), v);
              }
            }
          });
    }
  });
}
#endif

}  // namespace

// x bf16 [M, K]; w_tiles from ember.models.layers.linear.tile_bf16_weight. Needs N % 16 == 0, K % 32 == 0.
torch::Tensor bf16_linear_amx(torch::Tensor x, torch::Tensor w_tiles, int64_t out_features) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16, "x must be bfloat16 [M, K]");
  x = x.contiguous();
  const int64_t m = x.size(0), k = x.size(1), n = out_features;
  TORCH_CHECK(n % 16 == 0 && k % 32 == 0, "needs out_features % 16 == 0 and in_features % 32 == 0");
  TORCH_CHECK(w_tiles.numel() == n * k && w_tiles.scalar_type() == torch::kBFloat16 && w_tiles.is_contiguous(),
              "w_tiles must be the contiguous bfloat16 tile repack of an [N, K] weight");
  auto y = torch::empty({m, n}, x.options());
#ifdef EMBER_BF16_AMX
  TORCH_CHECK(ember_amx::request_amx(), "AMX-BF16 is not available");
  if (m == 0) return y;
  const torch::Tensor tail = ember_amx::padded_tail(x);
  const Problem p{x.data_ptr<at::BFloat16>(), tail.defined() ? tail.data_ptr<at::BFloat16>() : nullptr,
                  static_cast<const uint8_t*>(w_tiles.data_ptr()), y.data_ptr<at::BFloat16>(), m, n, k};
  run_bf16(p);
#else
  TORCH_CHECK(false, "built without AMX-BF16");
#endif
  return y;
}

void register_bf16(pybind11::module& m) {
  m.def("bf16_linear_amx", &bf16_linear_amx, "bf16 x @ W^T on AMX tiles, W in the tile layout");
}
