// What the batched linears on AVX512-BF16 share (quant/woq_dpbf16.cpp, core/bf16_dpbf16.cpp): the weight as
// panels of 32 output channels in bfloat16 pairs of k (16 32-bit words per block of 16 channels and pair:
// word c holds channel c's k even in its low half, k odd in its high half), and every block of up to 12 rows
// multiplied with `vdpbf16ps` (the product of two bfloat16 values is exact in float32): 12 x 2 float32
// accumulators, 2 weight vectors and 1 broadcast row, rounded once to bfloat16. A panel's words are
// addressed as block * block_stride + pair * pair_stride: [blocks][K/2][16] in a buffer filled per call,
// [K/2][blocks][16] in a prepacked weight, which a call then reads as one stream.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define EMBER_DPBF16 1

namespace ember_dpbf16 {

constexpr int64_t kBlockN = 16;  // channels per accumulator vector
constexpr int kMaxRows = 12;     // rows per micro-kernel call

// Where a panel's blocks are: the first word, and the strides between blocks and between pairs.
struct Panel {
  const uint32_t* words;
  int64_t block_stride, pair_stride;
};

// MR rows of x (bfloat16 pairs, `pairs` words a row) against NB blocks of the panel; the accumulators are
// multiplied by the channels' `scale` when given.
template <int MR, int NB>
inline void micro(const Panel& panel, int64_t pairs, const uint32_t* x, const float* scale, at::BFloat16* y,
                  int64_t n) {
  __m512 acc[MR][NB];
  for (int m = 0; m < MR; ++m)
    for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh w[NB];
    for (int b = 0; b < NB; ++b)
      w[b] = (__m512bh)_mm512_loadu_si512(panel.words + b * panel.block_stride + p * panel.pair_stride);
    for (int m = 0; m < MR; ++m) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[m * pairs + p]));
      for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_dpbf16_ps(acc[m][b], w[b], xv);
    }
  }
  for (int b = 0; b < NB; ++b) {
    const __m512 s = scale ? _mm512_loadu_ps(scale + b * kBlockN) : _mm512_set1_ps(1.f);
    for (int m = 0; m < MR; ++m) {
      const __m512 out = scale ? _mm512_mul_ps(acc[m][b], s) : acc[m][b];
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + m * n + b * kBlockN), (__m256i)_mm512_cvtneps_pbh(out));
    }
  }
}

// micro<rows, NB> for rows = 1..MR.
template <int NB, int MR = kMaxRows>
inline void rows_block(int rows, const Panel& panel, int64_t pairs, const uint32_t* x, const float* scale,
                       at::BFloat16* y, int64_t n) {
  if constexpr (MR > 1) {
    if (rows < MR) return rows_block<NB, MR - 1>(rows, panel, pairs, x, scale, y, n);
  }
  micro<MR, NB>(panel, pairs, x, scale, y, n);
}

// y [M, N] = x [M, K] against every panel. panel(first block, blocks, buffer) returns the Panel of those
// blocks: a prepacked weight's own words, or words it wrote into `buffer`. `scale` (per channel, or null)
// multiplies the sums.
template <typename PanelOf>
void run_panels(const torch::Tensor& x, int64_t n, const float* scale, torch::Tensor& y, PanelOf panel_of) {
  const int64_t m = x.size(0), pairs = x.size(1) / 2;
  const auto* xp = reinterpret_cast<const uint32_t*>(x.data_ptr<at::BFloat16>());
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  const int64_t blocks = n / kBlockN, panels = (blocks + 1) / 2;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> buffer;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t nb = 2 * i, count = std::min<int64_t>(2, blocks - nb);
      const Panel panel = panel_of(nb, count, buffer);
      const float* panel_scale = scale ? scale + nb * kBlockN : nullptr;
      for (int64_t m0 = 0; m0 < m; m0 += kMaxRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kMaxRows, m - m0));
        at::BFloat16* dst = yp + m0 * n + nb * kBlockN;
        if (count == 2) rows_block<2>(rows, panel, pairs, xp + m0 * pairs, panel_scale, dst, n);
        else rows_block<1>(rows, panel, pairs, xp + m0 * pairs, panel_scale, dst, n);
      }
    }
  });
}

}  // namespace ember_dpbf16
#endif
