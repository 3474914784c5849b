// W8A8 linear on AMX-INT8: y[M, N] = (codes[M, K] @ W[N, K]^T) * x_scale[m] * w_scale[n] (+ bias[n]).
// int8 x int8 products summed exactly in int32 tiles; the rescale is fused into the tile store and
// rounds as rescale_rows does (float32: acc * x_scale, then * w_scale, then + bias), so the output
// equals torch._int_mm followed by rescale_rows bit for bit.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>

#include "amx.h"

#if defined(EMBER_AMX) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#define EMBER_W8A8_AMX 1
#endif

namespace {

#ifdef EMBER_W8A8_AMX
using ember_amx::kTileRows;
constexpr int64_t kTileK = 64;                       // int8 k values per A tile row
constexpr int64_t kTileCodes = kTileRows * kTileK;   // bytes of one B tile: 16 k quads x 16 columns x 4

struct W8A8Problem {
  const int8_t* x;     // [M, K] codes
  const int8_t* tail;  // [32, K]: the last M % 32 rows, zero padded (null when M % 16 == 0)
  const int8_t* w;     // [N / 16, K / 64, 16, 64] tile-ordered weight codes
  const float* xs;     // [M]
  const float* ws;     // [N]
  const float* bias;   // [N] or null
  int64_t m, n, k;
};

template <typename T>
void store16(T* dst, __m512 v) {
  if constexpr (std::is_same_v<T, float>) _mm512_storeu_ps(dst, v);
  else _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh(v));
}

// int32 accumulators [rows, 16 * nbs] (row stride 32) -> rescaled output rows
template <typename T>
void store_rows(const int32_t* acc, const W8A8Problem& p, int64_t m0, int64_t rows, int64_t n0, int64_t cols,
                T* y) {
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 s = _mm512_set1_ps(p.xs[m0 + r]);
    for (int64_t c = 0; c < cols; c += 16) {
      const __m512 a = _mm512_cvtepi32_ps(_mm512_loadu_si512(acc + r * 32 + c));
      __m512 v = _mm512_mul_ps(_mm512_mul_ps(a, s), _mm512_loadu_ps(p.ws + n0 + c));
      if (p.bias) v = _mm512_add_ps(v, _mm512_loadu_ps(p.bias + n0 + c));
      store16(y + (m0 + r) * p.n + n0 + c, v);
    }
  }
}

template <typename T>
void run_w8a8(const W8A8Problem& p, T* y) {
  const ember_amx::TaskGrid grid(p.m, p.n);
  const int64_t k_tiles = p.k / kTileK;
  const ember_amx::Rows rows{reinterpret_cast<const uint8_t*>(p.x), reinterpret_cast<const uint8_t*>(p.tail), p.k};
  ember_amx::parallel_tasks(grid, [&](int64_t begin, int64_t end, void* acc) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t nb0 = grid.nb0(t), nbs = grid.nbs(t);
      const auto* b0 = reinterpret_cast<const uint8_t*>(p.w + nb0 * k_tiles * kTileCodes);
      ember_amx::row_blocks<ember_amx::Dot::kInt8>(
          rows, grid.r0(t), grid.r1(t), b0, b0 + k_tiles * kTileCodes, kTileCodes, k_tiles, nbs, acc, [] {},
          [&](int64_t m0, int64_t n_rows) {
            store_rows(static_cast<const int32_t*>(acc), p, m0, n_rows, nb0 * 16, nbs * 16, y);
          });
    }
  });
}
#endif

bool has_amx_int8() {
#ifdef EMBER_W8A8_AMX
  return ember_amx::request_amx();
#else
  return false;
#endif
}

// codes int8 [M, K] with x_scale float32 [M] (per token); w_tiles from ember.quant.w8a8_amx.tile_codes;
// w_scale float32 [N]; bias float32 [N] or None. Needs N % 16 == 0 and K % 64 == 0.
torch::Tensor w8a8_linear_amx(torch::Tensor codes, torch::Tensor x_scale, torch::Tensor w_tiles,
                              torch::Tensor w_scale, c10::optional<torch::Tensor> bias, at::ScalarType dtype) {
  TORCH_CHECK(has_amx_int8(), "AMX-INT8 is not available");
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == torch::kInt8, "codes must be int8 [M, K]");
  TORCH_CHECK(dtype == torch::kBFloat16 || dtype == torch::kFloat32, "output must be bfloat16 or float32");
  codes = codes.contiguous();
  const int64_t m = codes.size(0), k = codes.size(1), n = w_scale.numel();
  TORCH_CHECK(n % 16 == 0 && k % 64 == 0, "needs out_features % 16 == 0 and in_features % 64 == 0");
  TORCH_CHECK(w_tiles.numel() == n * k && w_tiles.element_size() == 1, "w_tiles must hold N * K bytes");
  auto xs = x_scale.to(torch::kFloat32).contiguous().view({-1});
  auto ws = w_scale.to(torch::kFloat32).contiguous().view({-1});
  TORCH_CHECK(xs.numel() == m, "x_scale must have one value per row");
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->to(torch::kFloat32).contiguous().view({-1});
    TORCH_CHECK(b.numel() == n, "bias size must match out_features");
  }
  auto y = torch::empty({m, n}, torch::dtype(dtype));
#ifdef EMBER_W8A8_AMX
  if (m == 0) return y;
  w_tiles = w_tiles.contiguous();
  const torch::Tensor tail = ember_amx::padded_tail(codes);
  const W8A8Problem p{codes.data_ptr<int8_t>(), tail.defined() ? tail.data_ptr<int8_t>() : nullptr,
                      static_cast<const int8_t*>(w_tiles.data_ptr()), xs.data_ptr<float>(), ws.data_ptr<float>(),
                      b.defined() ? b.data_ptr<float>() : nullptr, m, n, k};
  if (dtype == torch::kBFloat16) run_w8a8(p, y.data_ptr<at::BFloat16>());
  else run_w8a8(p, y.data_ptr<float>());
#endif
  return y;
}

}  // namespace

void register_w8a8(pybind11::module& m) {
  m.def("w8a8_linear_amx", &w8a8_linear_amx, "int8 codes @ W^T on AMX-INT8 tiles, rescaled per row and column");
}
