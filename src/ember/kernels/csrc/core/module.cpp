// The core extension: paged decode attention (bfloat16, float32 and int8 caches), the fused bfloat16
// elementwise ops and the dense bfloat16 linears for short calls (AMX tiles, AVX512-BF16 GEMV and panels). Built with -ffast-math.
#include <torch/extension.h>

#include "gemv.h"
#include "isa.h"

void register_paged_decode(pybind11::module& m);  // paged_decode.cpp
void register_paged_decode_int8(pybind11::module& m);  // paged_decode_int8.cpp
void register_fused_ops(pybind11::module& m);     // fused_ops.cpp
void register_bf16(pybind11::module& m);          // bf16_amx.cpp
void register_bf16_gemv(pybind11::module& m);     // bf16_gemv.cpp
void register_bf16_dpbf16(pybind11::module& m);   // bf16_dpbf16.cpp
void register_decode_layers(pybind11::module& m);  // decode_layers.cpp
void register_paged_prefill(pybind11::module& m);  // paged_prefill.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("compiled_isa", &ember_isa::compiled_isa, "instruction sets this build was compiled for");
  m.attr("max_gemv_tokens") = ember_gemv::kMaxTokens;
  register_paged_decode(m);
  register_paged_decode_int8(m);
  register_fused_ops(m);
  register_bf16(m);
  register_bf16_gemv(m);
  register_bf16_dpbf16(m);
  register_decode_layers(m);
  register_paged_prefill(m);
}
