// AMX tile plumbing shared by the AMX kernels: the per-process permission, a uniform tile config, the
// 2 x 2 tile block, the walk over 32-row blocks and the split of an output into per-thread tasks.
#pragma once

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AMX_INT8__)
#define EMBER_AMX 1
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>

namespace ember_amx {

constexpr int64_t kTileRows = 16;  // rows of every tile
constexpr int64_t kTileBytes = 64;  // bytes per tile row

// Linux keeps AMX tile data disabled per process until asked (ARCH_REQ_XCOMP_PERM, XTILEDATA).
inline bool request_amx() {
  static const bool granted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return granted;
}

struct alignas(64) TileConfig {
  uint8_t palette_id = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// All 8 tiles as 16 rows x 64 bytes (the kernels zero-pad partial row blocks instead of reconfiguring).
inline void load_tile_config() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = kTileBytes;
    cfg.rows[t] = kTileRows;
  }
  _tile_loadconfig(&cfg);
}

enum class Dot { kBF16, kInt8 };  // tdpbf16ps (float32 sums) or tdpbssd (int32 sums)

// The tile intrinsics paste their register numbers into assembly: they need literals, hence a macro.
#define EMBER_TILE_DOT(D, C, A, B)                    \
  do {                                                \
    if constexpr (D == ember_amx::Dot::kBF16) {       \
      _tile_dpbf16ps(C, A, B);                        \
    } else {                                          \
      _tile_dpbssd(C, A, B);                          \
    }                                                 \
  } while (0)

// C[16 NA x 16 NB] += A[16 NA rows, 64 bytes per k tile] @ B, over k_tiles. Tiles 0-3: C (2 row
// blocks x 2 column blocks); 4-5: A; 6-7: B. a: row stride lda bytes, next k tile 64 bytes on;
// b0 / b1: the two column blocks' B tiles, the next k tile b_step bytes on. acc: [16 NA, 32] of
// 4-byte sums (float32 or int32). hook() runs once per k tile, between the tile products: vector
// work placed there overlaps with the tile unit's.
template <Dot D, int NA, int NB, typename Hook>
void tile_block(const uint8_t* a, int64_t lda, const uint8_t* b0, const uint8_t* b1, int64_t b_step,
                int64_t k_tiles, void* acc, Hook&& hook) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    _tile_loadd(4, a + kt * kTileBytes, lda);
    _tile_loadd(6, b0 + kt * b_step, kTileBytes);
    EMBER_TILE_DOT(D, 0, 4, 6);
    if constexpr (NB == 2) {
      _tile_loadd(7, b1 + kt * b_step, kTileBytes);
      EMBER_TILE_DOT(D, 1, 4, 7);
    }
    if constexpr (NA == 2) {
      _tile_loadd(5, a + kTileRows * lda + kt * kTileBytes, lda);
      EMBER_TILE_DOT(D, 2, 5, 6);
      if constexpr (NB == 2) EMBER_TILE_DOT(D, 3, 5, 7);
    }
    hook();
  }
  auto* out = static_cast<uint8_t*>(acc);  // rows of 32 sums = 128 bytes
  _tile_stored(0, out, 128);
  if constexpr (NB == 2) _tile_stored(1, out + 64, 128);
  if constexpr (NA == 2) {
    _tile_stored(2, out + kTileRows * 128, 128);
    if constexpr (NB == 2) _tile_stored(3, out + kTileRows * 128 + 64, 128);
  }
}

// Tiles always read 16 rows: when M % 16 != 0, the last M % 32 rows of x [M, K] also go into a
// zero-padded 32-row copy (an undefined tensor otherwise).
inline torch::Tensor padded_tail(const torch::Tensor& x) {
  const int64_t m = x.size(0);
  if (m % kTileRows == 0) return {};
  auto tail = torch::zeros({2 * kTileRows, x.size(1)}, x.options());
  tail.narrow(0, 0, m % 32).copy_(x.narrow(0, m - m % 32, m % 32));
  return tail;
}

// The A operand of a call: row m of x at x + m * lda bytes; a partial last block is read from tail.
struct Rows {
  const uint8_t* x;
  const uint8_t* tail;
  int64_t lda;
};

// Rows [r0, r1) (r0 a multiple of 32) in 32-row blocks against one or two column blocks (nbs) of B
// tiles (as tile_block); after each block store(m0, rows) takes the sums left in acc.
template <Dot D, typename Hook, typename Store>
void row_blocks(const Rows& rows_of, int64_t r0, int64_t r1, const uint8_t* b0, const uint8_t* b1, int64_t b_step,
                int64_t k_tiles, int64_t nbs, void* acc, Hook&& hook, Store&& store) {
  for (int64_t m0 = r0; m0 < r1; m0 += 2 * kTileRows) {
    const int64_t rows = std::min<int64_t>(2 * kTileRows, r1 - m0);
    const uint8_t* a = rows % kTileRows == 0 ? rows_of.x + m0 * rows_of.lda : rows_of.tail;
    if (rows > kTileRows) {
      if (nbs == 2) tile_block<D, 2, 2>(a, rows_of.lda, b0, b1, b_step, k_tiles, acc, hook);
      else tile_block<D, 2, 1>(a, rows_of.lda, b0, b1, b_step, k_tiles, acc, hook);
    } else {
      if (nbs == 2) tile_block<D, 1, 2>(a, rows_of.lda, b0, b1, b_step, k_tiles, acc, hook);
      else tile_block<D, 1, 1>(a, rows_of.lda, b0, b1, b_step, k_tiles, acc, hook);
    }
    store(m0, rows);
  }
}

// Tasks over an [M, N] output: 32 columns (two column blocks) by up to 256 rows, the rows a task keeps
// in L2 while it walks K. Task t covers row chunk t / col_tasks, so neighbouring tasks share x rows.
struct TaskGrid {
  static constexpr int64_t kRowChunk = 256;
  int64_t m, n_blocks, col_tasks;

  TaskGrid(int64_t rows, int64_t cols) : m(rows), n_blocks(cols / 16), col_tasks((cols / 16 + 1) / 2) {}
  int64_t size() const { return (m + kRowChunk - 1) / kRowChunk * col_tasks; }
  int64_t r0(int64_t t) const { return t / col_tasks * kRowChunk; }
  int64_t r1(int64_t t) const { return std::min(r0(t) + kRowChunk, m); }
  int64_t nb0(int64_t t) const { return t % col_tasks * 2; }
  int64_t nbs(int64_t t) const { return std::min<int64_t>(2, n_blocks - nb0(t)); }
};

// Splits the grid's tasks over the threads; each runs fn(begin, end, acc) with the tiles configured and
// a [32, 32] accumulator of 4-byte sums.
template <typename Fn>
void parallel_tasks(const TaskGrid& grid, Fn&& fn) {
  at::parallel_for(0, grid.size(), 1, [&](int64_t begin, int64_t end) {
    load_tile_config();
    alignas(64) int32_t acc[2 * kTileRows * 32];
    fn(begin, end, static_cast<void*>(acc));
    _tile_release();
  });
}

}  // namespace ember_amx
#endif
