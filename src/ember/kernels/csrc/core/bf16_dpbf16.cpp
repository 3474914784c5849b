// bfloat16 linear for calls of more rows than the GEMV takes (5 to a few dozen: decode steps of small
// batches, the rows that verify drafts), on AVX512-BF16 without AMX. The weight is prepacked once into
// panels of bfloat16 pairs of k (dpbf16_panels.h), so a call streams it once and every block of up to 12
// rows multiplies each panel from cache with `vdpbf16ps`: exact products, float32 sums rounded once.
// oneDNN's bf16 matmul reads the weights of a 5-16 row call at roughly half the memory's speed here.
#include <torch/extension.h>

#include <vector>

#include "dpbf16_panels.h"

// x bf16 [M, K]; panels int32 [ceil(N / 32), K / 2, B, 16] with B = 2 (B = 1 for a last panel of 16
// channels, stored after the others): word c of block b and pair p holds channel 32 i + 16 b + c's k = 2p in
// its low half, k = 2p + 1 in its high half. Returns y bf16 [M, N].
torch::Tensor bf16_linear_dpbf16(torch::Tensor x, torch::Tensor panels, int64_t out_features) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16, "x must be bfloat16 [M, K]");
  const int64_t m = x.size(0), n = out_features, pairs = x.size(1) / 2;
  TORCH_CHECK(n % 16 == 0 && x.size(1) % 2 == 0 && panels.scalar_type() == torch::kInt32 &&
                  panels.numel() == n * pairs,
              "panels must be int32 words of [N / 32, K / 2, 2, 16] (+ [K / 2, 16]) for N = out_features");
  auto y = torch::empty({m, n}, x.options());
#ifdef EMBER_DPBF16
  if (m == 0) return y;
  x = x.contiguous();
  panels = panels.contiguous();
  const auto* words = reinterpret_cast<const uint32_t*>(panels.data_ptr<int32_t>());
  constexpr int64_t kBlockN = ember_dpbf16::kBlockN;
  ember_dpbf16::run_panels(x, n, nullptr, y, [&](int64_t first, int64_t count, std::vector<uint32_t>&) {
    // panel `first / 2` starts after first / 2 full panels of 2 * pairs * 16 words; its blocks interleave
    return ember_dpbf16::Panel{words + first * pairs * kBlockN, kBlockN, count * kBlockN};
  });
#else
  TORCH_CHECK(false, "built without AVX512-BF16");
#endif
  return y;
}

void register_bf16_dpbf16(pybind11::module& m) {
  m.def("bf16_linear_dpbf16", &bf16_linear_dpbf16,
        "bf16 x [M, K] @ a bf16 weight prepacked by pairs of k, with vdpbf16ps; float32 sums rounded once");
}
