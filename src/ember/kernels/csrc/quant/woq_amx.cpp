// Weight-only quantized linear on AMX-BF16: y[M, N] = x[M, K] @ dequant(W)[N, K]^T, bfloat16 in and
// out, float32 tile accumulators. Weight tiles are dequantized on the fly (code * scale + offset in
// float32, rounded once to bfloat16: the same values as QuantizedWeight.dequantize(torch.bfloat16))
// into the VNNI layout of AMX B tiles. Up to 64 rows (decode steps): one 16-column block per task with
// all rows in tiles, each B tile dequantized just before its products. Beyond: one 32-column panel per
// task, reused for every row block; a thread dequantizes its next panel a few tiles at a time between
// the current panel's tile products.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <vector>

#include "amx.h"

#if defined(EMBER_AMX) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#define EMBER_WOQ_AMX 1
#endif

namespace {

#ifdef EMBER_WOQ_AMX
using ember_amx::kTileRows;  // rows of every tile (M rows of A / C, k pairs of B)
using ember_amx::request_amx;
constexpr int64_t kTileK = 32;     // bf16 k values per A tile row (64 bytes)
constexpr int64_t kTileElems = kTileRows * kTileK;  // bf16 values of one dequantized B tile

// One B tile: 16 k pairs x 16 columns, a row of 16 bytes (int4, in float32 lane order: see
// ember.quant.woq_amx.tile_codes) or 32 (int8: [column][even k, odd k]). scale / offset: the 16 columns'.
// Lanes are kept in VNNI order (column c's even k, then its odd k) from the start: the 32 values of
// a row become float32 vectors for columns 0-7 and 8-15, whose bf16 conversion is the tile row.
template <int Bits>
void dequantize_tile(const uint8_t* codes, const float* scale, const float* offset, at::BFloat16* dst) {
  const __m512i low_cols = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i high_cols = _mm512_add_epi32(low_cols, _mm512_set1_epi32(8));
  const __m512 s = _mm512_loadu_ps(scale), o = _mm512_loadu_ps(offset);
  const __m512 s_lo = _mm512_permutexvar_ps(low_cols, s), s_hi = _mm512_permutexvar_ps(high_cols, s);
  const __m512 o_lo = _mm512_permutexvar_ps(low_cols, o), o_hi = _mm512_permutexvar_ps(high_cols, o);
  for (int64_t r = 0; r < kTileRows; ++r) {
    __m512i lo, hi;  // int32 codes of columns 0-7 and 8-15, even and odd k interleaved
    if constexpr (Bits == 4) {
      // byte j: lane j of columns 0-7 in the low nibble, of columns 8-15 in the high one (tile_codes)
      const __m512i both = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + r * 16)));
      lo = _mm512_and_si512(both, _mm512_set1_epi32(0x0F));
      hi = _mm512_srli_epi32(both, 4);
    } else {
      lo = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + r * 32)));
      hi = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + r * 32 + 16)));
    }
    // multiply and add rounded separately, as PyTorch's reference does
    const __m512 w_lo = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(lo), s_lo), o_lo);
    const __m512 w_hi = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(hi), s_hi), o_hi);
    _mm512_storeu_si512(dst + r * kTileK, (__m512i)_mm512_cvtne2ps_pbh(w_hi, w_lo));
  }
}

// Float32 accumulators [rows, cols] (row stride lda) -> bfloat16 output rows.
void store_rows(const float* acc, int64_t lda, int64_t rows, int64_t cols, at::BFloat16* y, int64_t ldy) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; c += 16) {
      const __m256i v = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(acc + r * lda + c));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + r * ldy + c), v);
    }
  }
}

struct WoqProblem {
  const at::BFloat16* x;     // [M, K]
  const at::BFloat16* tail;  // [32, K]: the last M % 32 rows, zero padded (null when M % 16 == 0)
  const uint8_t* codes;      // [N / 16, K / 32, 16, 16 * bytes_per_pair]
  const float* scales;       // [N / 16, G, 16]
  const float* offsets;      // [N / 16, G, 16]
  at::BFloat16* y;           // [M, N]
  int64_t m, n, k, groups, group_len;
};

// Dequantizes one task's panel (its one or two column blocks, K deep, laid out [k tile][block]) tile by
// tile, so the work can be spread over the previous panel's tile products.
template <int Bits>
struct PanelDequantizer {
  const WoqProblem& p;
  int64_t nb0 = 0, blocks = 0, next = 0, total = 0;
  at::BFloat16* panel = nullptr;

  void start(int64_t first_block, int64_t num_blocks, at::BFloat16* dst) {
    nb0 = first_block, blocks = num_blocks, panel = dst, next = 0, total = num_blocks * (p.k / kTileK);
  }
  void run(int64_t count) {
    const int64_t k_tiles = p.k / kTileK;
    for (; count > 0 && next < total; --count, ++next) {
      const int64_t j = next / k_tiles, kt = next % k_tiles, nb = nb0 + j;
      const int64_t param = (nb * p.groups + kt * kTileK / p.group_len) * 16;
      dequantize_tile<Bits>(p.codes + (nb * k_tiles + kt) * kTileElems * Bits / 8, p.scales + param,
                            p.offsets + param, panel + (kt * blocks + j) * kTileElems);
    }
  }
};

// Tasks of 32 columns (ember_amx::TaskGrid): measured faster than 64-column panels at every token count
// once the next panel's dequantization overlaps with the tile products (16-1024 tokens, SmolLM2
// shapes); 256-row chunks measured best or within noise of 64-512.
template <int Bits>
void run_woq(const WoqProblem& p) {
  const ember_amx::TaskGrid grid(p.m, p.n);
  const int64_t k_tiles = p.k / kTileK, panel_elems = p.k * 32;
  const ember_amx::Rows rows{reinterpret_cast<const uint8_t*>(p.x), reinterpret_cast<const uint8_t*>(p.tail),
                             p.k * 2};
  ember_amx::parallel_tasks(grid, [&](int64_t begin, int64_t end, void* acc) {
    std::vector<at::BFloat16> buffers(2 * panel_elems);  // this task's panel and the next one's
    PanelDequantizer<Bits> ahead{p};
    ahead.start(grid.nb0(begin), grid.nbs(begin), buffers.data());
    ahead.run(ahead.total);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t nb0 = grid.nb0(t), nbs = grid.nbs(t);
      const at::BFloat16* panel = buffers.data() + (t - begin) % 2 * panel_elems;
      at::BFloat16* next_panel = buffers.data() + (t + 1 - begin) % 2 * panel_elems;
      if (t + 1 < end) ahead.start(grid.nb0(t + 1), grid.nbs(t + 1), next_panel);
      else ahead.start(0, 0, nullptr);
      // spread the next panel over this task's k steps
      const int64_t steps = (grid.r1(t) - grid.r0(t) + 2 * kTileRows - 1) / (2 * kTileRows) * k_tiles;
      const int64_t per_step = (ahead.total + steps - 1) / steps;
      const auto* b0 = reinterpret_cast<const uint8_t*>(panel);
      ember_amx::row_blocks<ember_amx::Dot::kBF16>(
          rows, grid.r0(t), grid.r1(t), b0, b0 + kTileElems * 2, nbs * kTileElems * 2, k_tiles, nbs, acc,
          [&] { ahead.run(per_step); },
          [&](int64_t m0, int64_t n_rows) {
            store_rows(static_cast<const float*>(acc), 32, n_rows, 16 * nbs, p.y + m0 * p.n + nb0 * 16, p.n);
          });
      ahead.run(ahead.total);  // whatever the steps did not cover
    }
  });
}

// Calls of at most 64 rows: one task per 16-column block, all rows at once (up to 4 row tiles, sums in
// tiles 0-3), each B tile dequantized just before its products into a two-tile ring that stays in L1.
// Tiles are not renamed: a tile load waits for the products still reading that tile, so row tiles 0-2
// get A tiles 4-6 of their own (the fourth reuses 4) and B stays in 7 (measured 10% faster at 49-64
// rows than 2 A and 2 B tiles, and within noise of alternating B tiles at fewer rows).
constexpr int64_t kNarrowRows = 4 * kTileRows;

template <int Bits, int NA>
void narrow_block(const WoqProblem& p, const uint8_t* const* a, int64_t nb, at::BFloat16* ring, float* acc) {
  const int64_t k_tiles = p.k / kTileK, lda = p.k * 2;
  const uint8_t* codes = p.codes + nb * k_tiles * kTileElems * Bits / 8;
  auto dequantize = [&](int64_t kt) {
    if (kt >= k_tiles) return;
    const int64_t param = (nb * p.groups + kt * kTileK / p.group_len) * 16;
    if (nb + 1 < p.n / 16) {  // the next block's tile into L2: 5-8% less per layer when codes come from memory
      const char* next = reinterpret_cast<const char*>(codes + (k_tiles + kt) * kTileElems * Bits / 8);
      for (int64_t line = 0; line < kTileElems * Bits / 8; line += 64) _mm_prefetch(next + line, _MM_HINT_T1);
      if (kt * kTileK % p.group_len == 0) {
        _mm_prefetch(reinterpret_cast<const char*>(p.scales + param + p.groups * 16), _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(p.offsets + param + p.groups * 16), _MM_HINT_T1);
      }
    }
    dequantize_tile<Bits>(codes + kt * kTileElems * Bits / 8, p.scales + param, p.offsets + param,
                          ring + kt % 2 * kTileElems);
  };
  _tile_zero(0);
  if constexpr (NA > 1) _tile_zero(1);
  if constexpr (NA > 2) _tile_zero(2);
  if constexpr (NA > 3) _tile_zero(3);
  dequantize(0);
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    _tile_loadd(7, ring + kt % 2 * kTileElems, 64);
    dequantize(kt + 1);
    _tile_loadd(4, a[0] + kt * 64, lda);
    if constexpr (NA > 1) _tile_loadd(5, a[1] + kt * 64, lda);
    if constexpr (NA > 2) _tile_loadd(6, a[2] + kt * 64, lda);
    _tile_dpbf16ps(0, 4, 7);
    if constexpr (NA > 1) _tile_dpbf16ps(1, 5, 7);
    if constexpr (NA > 2) _tile_dpbf16ps(2, 6, 7);
    if constexpr (NA > 3) {
      _tile_loadd(4, a[3] + kt * 64, lda);
      _tile_dpbf16ps(3, 4, 7);
    }
  }
  _tile_stored(0, acc, 64);
  if constexpr (NA > 1) _tile_stored(1, acc + 1 * kTileRows * 16, 64);
  if constexpr (NA > 2) _tile_stored(2, acc + 2 * kTileRows * 16, 64);
  if constexpr (NA > 3) _tile_stored(3, acc + 3 * kTileRows * 16, 64);
}

template <int Bits>
void run_woq_narrow(const WoqProblem& p) {
  const int64_t full = p.m - p.m % (2 * kTileRows), row_tiles = (p.m + kTileRows - 1) / kTileRows;
  const uint8_t* a[4];
  for (int64_t r = 0; r < row_tiles; ++r) {
    a[r] = reinterpret_cast<const uint8_t*>((r + 1) * kTileRows <= p.m ? p.x + r * kTileRows * p.k
                                                                  : p.tail + (r * kTileRows - full) * p.k);
  }
  at::parallel_for(0, p.n / 16, 1, [&](int64_t begin, int64_t end) {
    ember_amx::load_tile_config();
    alignas(64) at::BFloat16 ring[2 * kTileElems];
    alignas(64) float acc[kNarrowRows * 16];
    for (int64_t nb = begin; nb < end; ++nb) {
      switch (row_tiles) {
        case 1: narrow_block<Bits, 1>(p, a, nb, ring, acc); break;
        case 2: narrow_block<Bits, 2>(p, a, nb, ring, acc); break;
        case 3: narrow_block<Bits, 3>(p, a, nb, ring, acc); break;
        default: narrow_block<Bits, 4>(p, a, nb, ring, acc); break;
      }
      store_rows(acc, 16, p.m, 16, p.y + nb * 16, p.n);
    }
    _tile_release();
  });
}

#endif

bool has_amx() {
#ifdef EMBER_WOQ_AMX
  return request_amx();
#else
  return false;
#endif
}

// x bf16 [M, K]; codes from the tile repack (ember.quant.woq_amx.tile_codes); scales / offsets float32
// [N / 16, G, 16] with explicit offsets. Needs N % 16 == 0, K % 32 == 0, (K / G) % 32 == 0.
torch::Tensor woq_linear_amx(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, torch::Tensor offsets,
                             int64_t bits, int64_t out_features) {
  TORCH_CHECK(has_amx(), "AMX-BF16 is not available");
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16, "x must be bfloat16 [M, K]");
  x = x.contiguous();
  const int64_t m = x.size(0), k = x.size(1), n = out_features;
  TORCH_CHECK(n % 16 == 0 && k % 32 == 0, "needs out_features % 16 == 0 and in_features % 32 == 0");
  TORCH_CHECK(scales.dim() == 3 && scales.size(0) == n / 16 && scales.size(2) == 16 &&
              scales.scalar_type() == torch::kFloat32 && offsets.sizes() == scales.sizes() &&
              offsets.scalar_type() == torch::kFloat32, "scales / offsets must be float32 [N / 16, G, 16]");
  const int64_t groups = scales.size(1);
  TORCH_CHECK(k % groups == 0 && (k / groups) % 32 == 0, "groups must span multiples of 32 columns");
  TORCH_CHECK(codes.numel() == n * k * bits / 8 && codes.scalar_type() == torch::kUInt8, "codes must be uint8");
  auto y = torch::empty({m, n}, x.options());
#ifdef EMBER_WOQ_AMX
  if (m == 0) return y;
  codes = codes.contiguous();
  scales = scales.contiguous();
  offsets = offsets.contiguous();
  const torch::Tensor tail = ember_amx::padded_tail(x);
  const WoqProblem p{x.data_ptr<at::BFloat16>(), tail.defined() ? tail.data_ptr<at::BFloat16>() : nullptr,
                     codes.data_ptr<uint8_t>(), scales.data_ptr<float>(), offsets.data_ptr<float>(),
                     y.data_ptr<at::BFloat16>(), m, n, k, groups, k / groups};
  const bool narrow = m <= kNarrowRows;
  if (bits == 4) narrow ? run_woq_narrow<4>(p) : run_woq<4>(p);
  else narrow ? run_woq_narrow<8>(p) : run_woq<8>(p);
#endif
  return y;
}

}  // namespace

void register_woq(pybind11::module& m) {
  m.def("woq_linear_amx", &woq_linear_amx, "bf16 x @ dequant(W)^T on AMX tiles, W in the tile layout");
}
