// What the decode GEMVs (bf16_gemv.cpp, int8_gemv.cpp) share: at most kMaxTokens activation rows a call,
// and the walk that gives every thread a band of weight rows with the token count as a template argument.
#pragma once

#include <ATen/Parallel.h>
#include <type_traits>

namespace ember_gemv {

constexpr int64_t kMaxTokens = 4;

// Calls band(std::integral_constant<int, M>{}, n0, n1) over bands of the n weight rows, M = m (1..4).
template <typename Band>
void for_row_bands(int64_t m, int64_t n, Band band) {
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    switch (m) {
      case 1: band(std::integral_constant<int, 1>{}, begin, end); break;
      case 2: band(std::integral_constant<int, 2>{}, begin, end); break;
      case 3: band(std::integral_constant<int, 3>{}, begin, end); break;
      default: band(std::integral_constant<int, 4>{}, begin, end); break;
    }
  });
}

}  // namespace ember_gemv
