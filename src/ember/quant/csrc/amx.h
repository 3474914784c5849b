// AMX tile plumbing shared by the AMX kernels: the per-process permission and a uniform tile config.
#pragma once

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AMX_INT8__)
#define EMBER_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

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

}  // namespace ember_amx
#endif
