// The instruction sets a build was compiled for (-march=native on the machine that built it), so Python
// can check a build against the CPU probe before any kernel of it runs.
#pragma once

#include <string>
#include <vector>

namespace ember_isa {

inline std::vector<std::string> compiled_isa() {
  std::vector<std::string> isa;
#if defined(__AVX2__) && defined(__FMA__)
  isa.push_back("avx2");
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  isa.push_back("avx512");
#endif
#if defined(__AVX512VNNI__)
  isa.push_back("avx512_vnni");
#endif
#if defined(__AVX512BF16__)
  isa.push_back("avx512_bf16");
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AMX_INT8__)
  isa.push_back("amx");
#endif
  return isa;
}

}  // namespace ember_isa
