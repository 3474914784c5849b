// The quant extension's kernels the decode loop needs (its linears, the int8 KV cache write) as a table
// of C function pointers, which it publishes as a PyCapsule (`c_api`) so that the core extension's decode
// loop can call them without a Python round trip. Both extensions are built against the same torch headers,
// so the signatures agree.
#pragma once

#include <torch/extension.h>

namespace ember_quant_api {

constexpr const char* kCapsuleName = "ember.quant.c_api";
constexpr int kVersion = 5;

struct Table {
  int version;
  // x [M, K] bf16/float32, repacked 4-bit codes, per-group scales and offsets, optional bias, group length
  torch::Tensor (*w4a8_linear)(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, torch::Tensor offsets,
                               c10::optional<torch::Tensor> bias, int64_t group_len);
  // K or V rows x [T, KVH, D] quantized per token into their slots of an int8 cache (codes, scales)
  void (*write_rows_int8)(torch::Tensor x, torch::Tensor slot_mapping, torch::Tensor codes, torch::Tensor scales);
  // weight-only int8 per channel: x [M <= 4, K] bf16, codes [N, K], scale [N] (int8_gemv.cpp)
  torch::Tensor (*int8_gemv)(torch::Tensor x, torch::Tensor codes, torch::Tensor scale);
  // weight-only int8 per channel, any M: codes by pairs of k, scale [N] (woq_dpbf16.cpp)
  torch::Tensor (*int8_linear_dpbf16)(torch::Tensor x, torch::Tensor codes, torch::Tensor scale);
  // weight-only int4 groups, any M: codes by 16-channel blocks, scales and offsets [N / 16, G, 16], group length,
  // optionally the input channels kept in float: index [C] and their bf16 columns [N / 16, C, 16]
  torch::Tensor (*int4_linear_dpbf16)(torch::Tensor x, torch::Tensor codes, torch::Tensor scales,
                                      torch::Tensor offsets, int64_t group_len,
                                      c10::optional<torch::Tensor> channel_index,
                                      c10::optional<torch::Tensor> channel_columns);
  // W8A8 per channel, x [M <= 4, K] quantized per token: codes [N, K], their row sums, scale [N], optional bias
  torch::Tensor (*w8a8_linear_gemv)(torch::Tensor x, torch::Tensor codes, torch::Tensor colsum, torch::Tensor w_scale,
                                    c10::optional<torch::Tensor> bias);
};

// The quant extension's one table, filled while its module registers (quant_ops.cpp).
Table& table();

}  // namespace ember_quant_api
