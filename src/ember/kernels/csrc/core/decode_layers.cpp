// Every decoder layer of a Llama-form model for one decode step, in one native call. A step whose tokens
// all decode spends as much time in Python between the kernels (module calls, reshapes, dispatch) as the
// kernels of a 4-bit model take; here the same kernels run in the same order on the same operands, so the
// result is bit for bit what the modules compute (ember.models.native_decode checks when that holds).
//
// Linears: W4A8 and weight-only int8 / int4 from the quant extension (through its c_api table), the dense
// bf16 GEMV, panel and AMX kernels of this extension, oneDNN and torch's packed weight-only ops through ATen.
// A quantized linear with input channels kept in float ("<kernel>+channels") adds x[:, index] @ weight^T
// to its kernel's output, as QuantLinear.forward does (kernels/linear/dense.py, add_channels): gathered and
// added in place by the bf16 GEMV up to its row count, else at::linear and an add. int4_dpbf16 takes the
// kept channels inside its panels instead (two more operands, no "+channels").
//
// Dual-precision ops (a quantized and a dense copy of one op) whose rows split between the two in this step
// run as the modules' DualPrecisionLinear does: the dense kernel on the dense rows, copied over the quantized
// kernel's output of every row (when dense rows are the fewer) or beside its output of the quantized rows.
//
// Per layer: RMSNorm -> qkv linear -> RoPE on q, k (in place) -> K/V written at the step's slots (bf16, or
// int8 per token) -> paged decode attention -> o_proj -> residual add -> RMSNorm -> gate_up -> SiLU-mul ->
// down -> add.
#include <torch/extension.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <string>
#include <vector>

#include "gemv.h"
#include "quant_api.h"

// The core extension's own ops (fused_ops.cpp, paged_decode.cpp, bf16_gemv.cpp, bf16_dpbf16.cpp, bf16_amx.cpp).
torch::Tensor rms_norm_bf16(torch::Tensor x, torch::Tensor weight, double eps);
void rope_bf16_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);
torch::Tensor silu_mul_bf16(torch::Tensor gate_up);
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor seq_lens, double scale);
torch::Tensor paged_decode_attention_int8(torch::Tensor q, torch::Tensor k_codes, torch::Tensor k_scales,
                                          torch::Tensor k_res_index, torch::Tensor k_res_codes, torch::Tensor k_res_scales,
                                          torch::Tensor v_codes, torch::Tensor v_scales, torch::Tensor v_res_index,
                                          torch::Tensor v_res_codes, torch::Tensor v_res_scales, torch::Tensor block_tables,
                                          torch::Tensor seq_lens, double scale);
torch::Tensor bf16_gemv(torch::Tensor x, torch::Tensor weight);
torch::Tensor bf16_gemv_channels_(torch::Tensor out, torch::Tensor x, torch::Tensor index, torch::Tensor weight);
torch::Tensor bf16_linear_amx(torch::Tensor x, torch::Tensor w_tiles, int64_t out_features);
torch::Tensor bf16_linear_dpbf16(torch::Tensor x, torch::Tensor panels, int64_t out_features);

namespace {

// One linear as its kernel runs it: the kernel's name, its prepared operands and one integer argument.
struct Linear {
  enum Kind {
    kW4A8, kBf16Gemv, kBf16Amx, kBf16Dpbf16, kOneDnn,        // W4A8 and dense bf16
    kInt8Gemv, kInt8Dpbf16, kInt4Dpbf16, kInt4Packed, kInt8Packed,  // weight-only
    kW8A8Gemv
  } kind;
  std::vector<torch::Tensor> operands;
  int64_t arg;  // w4a8_vnni, int4_dpbf16, int4_weight_only: group length; amx_bf16, bf16_dpbf16: out_features; others unused
  torch::Tensor channel_index, channel_weight;  // float input channels [C] and their weight [N, C], or undefined
};

constexpr char kChannels[] = "+channels";

// Operand `i` if the linear has it (an optional bias follows the kernel's own operands).
c10::optional<torch::Tensor> optional_operand(const std::vector<torch::Tensor>& operands, size_t i) {
  return operands.size() > i ? c10::optional<torch::Tensor>(operands[i]) : c10::nullopt;
}

// torch's mkldnn::_linear_pointwise (what the onednn_bf16 kernel calls from Python) on a prepacked weight.
torch::Tensor onednn_linear(const torch::Tensor& x, const torch::Tensor& packed) {
  static const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack{x, packed, c10::IValue(), c10::IValue("none"),
                          c10::IValue(c10::List<c10::optional<at::Scalar>>()), c10::IValue("")};
  op.callBoxed(&stack);
  return stack.back().toTensor();
}

Linear make_linear(std::string kernel, std::vector<torch::Tensor> operands, int64_t arg) {
  torch::Tensor channel_index, channel_weight;
  const size_t suffix = kernel.size() >= sizeof(kChannels) - 1 ? kernel.size() - (sizeof(kChannels) - 1) : 0;
  if (suffix > 0 && kernel.compare(suffix, std::string::npos, kChannels) == 0) {
    TORCH_CHECK(operands.size() >= 2, "'", kernel, "' ends with the channel index and weight");
    channel_weight = operands.back();
    operands.pop_back();
    channel_index = operands.back();
    operands.pop_back();
    TORCH_CHECK(channel_index.dim() == 1 && channel_index.scalar_type() == torch::kLong && channel_weight.dim() == 2 &&
                    channel_weight.size(1) == channel_index.size(0) && channel_weight.scalar_type() == torch::kBFloat16,
                "channels: int64 index [C] and bf16 weight [N, C]");
    kernel.resize(suffix);
  }
  size_t expected = 1;
  Linear::Kind kind;
  if (kernel == "w4a8_vnni") {
    kind = Linear::kW4A8;
    expected = 3;  // codes, scales, offsets (+ an optional bias)
  } else if (kernel == "bf16_gemv") {
    kind = Linear::kBf16Gemv;
  } else if (kernel == "amx_bf16") {
    kind = Linear::kBf16Amx;
  } else if (kernel == "bf16_dpbf16") {
    kind = Linear::kBf16Dpbf16;
  } else if (kernel == "onednn_bf16") {
    kind = Linear::kOneDnn;
  } else if (kernel == "int8_gemv") {
    kind = Linear::kInt8Gemv;
    expected = 2;  // codes, scales
  } else if (kernel == "int8_dpbf16") {
    kind = Linear::kInt8Dpbf16;
    expected = 2;  // codes by pairs of k, scales
  } else if (kernel == "int4_dpbf16") {
    kind = Linear::kInt4Dpbf16;
    expected = 3;  // codes by blocks, scales, offsets (+ the kept channels' index and columns, fused)
  } else if (kernel == "int4_weight_only") {
    kind = Linear::kInt4Packed;
    expected = 2;  // torch's packed codes, scales and zeros
  } else if (kernel == "int8_weight_only") {
    kind = Linear::kInt8Packed;
    expected = 2;  // codes, scales
  } else if (kernel == "w8a8_gemv") {
    kind = Linear::kW8A8Gemv;
    expected = 3;  // codes, their row sums, scales (+ an optional bias)
  } else {
    TORCH_CHECK(false, "the decode loop cannot run kernel '", kernel, "'");
  }
  const bool takes_bias = kind == Linear::kW4A8 || kind == Linear::kW8A8Gemv;
  const bool fuses_channels = kind == Linear::kInt4Dpbf16 && !channel_index.defined();
  TORCH_CHECK(operands.size() == expected || (takes_bias && operands.size() == expected + 1) ||
                  (fuses_channels && operands.size() == expected + 2),
              "kernel '", kernel, "' takes ", expected, " operands, got ", operands.size());
  return Linear{kind, std::move(operands), arg, channel_index, channel_weight};
}

// One linear of a layer as the step runs it: `main` on every row, or, when `split` >= 0, `dense` on the dense
// rows of the step's row split number `split` and `main` on every row (`overwrite`) or on the quantized rows.
struct Op {
  Linear main;
  int64_t split = -1;
  bool overwrite = false;
  std::vector<Linear> dense;  // one entry when split >= 0
};

// The layer's KV cache: bfloat16 K and V blocks, or an int8 cache with per-token scales and no residuals
// (K then V, each as paged_decode_attention_int8 takes it: codes, scales, empty residual index, codes, scales).
struct Cache {
  bool int8;
  std::vector<torch::Tensor> tensors;
};

struct Layer {
  torch::Tensor input_norm, post_norm;
  Cache cache;
  Op qkv, o_proj, gate_up, down;
};

// add_layer's description of a dual-precision linear's split: (split, overwrite, dense kernel, operands, argument).
using Half = std::tuple<int64_t, bool, std::string, std::vector<torch::Tensor>, int64_t>;

class DecodeLayers {
 public:
  DecodeLayers(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps, double scale,
               pybind11::object quant_api)
      : num_heads_(num_heads), num_kv_heads_(num_kv_heads), head_dim_(head_dim), eps_(eps), scale_(scale) {
    if (!quant_api.is_none()) {
      auto capsule = quant_api.cast<pybind11::capsule>();
      TORCH_CHECK(std::string(capsule.name()) == ember_quant_api::kCapsuleName, "not the quant extension's c_api");
      quant_ = capsule.get_pointer<ember_quant_api::Table>();
      TORCH_CHECK(quant_->version == ember_quant_api::kVersion, "quant extension c_api version mismatch");
    }
  }

  // cache: [key, value] bfloat16 blocks, or the 10 tensors of an int8 cache (see Cache); linears: (kernel name,
  // operands, argument) for qkv_proj, o_proj, gate_up_proj, down_proj; halves: empty, or for each of the four
  // linears (split, overwrite, dense kernel name, operands, argument), split -1 where its rows do not split.
  void add_layer(torch::Tensor input_norm, torch::Tensor post_norm, std::vector<torch::Tensor> cache,
                 const std::vector<std::tuple<std::string, std::vector<torch::Tensor>, int64_t>>& linears,
                 const std::vector<Half>& halves) {
    TORCH_CHECK(linears.size() == 4, "a layer has four linears: qkv_proj, o_proj, gate_up_proj, down_proj");
    TORCH_CHECK(halves.empty() || halves.size() == 4, "halves: none, or one entry per linear");
    std::vector<Op> ops;
    for (size_t i = 0; i < linears.size(); ++i) {
      const auto& [kernel, operands, arg] = linears[i];
      Op op{checked_linear(kernel, operands, arg)};
      if (!halves.empty() && std::get<0>(halves[i]) >= 0) {
        const auto& [split, overwrite, dense_kernel, dense_operands, dense_arg] = halves[i];
        op.split = split;
        op.overwrite = overwrite;
        op.dense.push_back(checked_linear(dense_kernel, dense_operands, dense_arg));
      }
      ops.push_back(std::move(op));
    }
    TORCH_CHECK(cache.size() == 2 || cache.size() == 10, "a cache is [key, value] or an int8 cache's 10 tensors");
    const bool int8 = cache.size() == 10;
    TORCH_CHECK(!int8 || quant_ != nullptr, "an int8 cache is written by the quant extension");
    for (const int64_t first : {int64_t{0}, int8 ? int64_t{5} : int64_t{1}}) {
      const torch::Tensor& rows = cache[first];
      TORCH_CHECK(rows.is_contiguous() && rows.dim() == 4 && rows.size(2) == num_kv_heads_ && rows.size(3) == head_dim_,
                  "caches must be contiguous [num_blocks, block_size, KVH, D]");
      TORCH_CHECK(!int8 || (cache[first + 1].dim() == 3 && cache[first + 2].numel() == 0),
                  "the loop writes int8 caches with per-token scales and no residuals only");
    }
    layers_.push_back(Layer{input_norm, post_norm, Cache{int8, std::move(cache)}, ops[0], ops[1], ops[2], ops[3]});
  }

  // x: [T, hidden] bf16, the embedded tokens; cos, sin: [T, 1, D]; slot_mapping: [T]; block_tables:
  // [T, max_blocks]; seq_lens: [T]; row_splits: the dense rows and the quantized rows (int64 indices into the
  // T rows) of each row split the layers' ops refer to. Returns the last layer's output (before the final norm).
  torch::Tensor forward(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, torch::Tensor slot_mapping,
                        torch::Tensor block_tables, torch::Tensor seq_lens,
                        const std::vector<torch::Tensor>& row_splits) const {
    TORCH_CHECK(row_splits.size() % 2 == 0, "row_splits: (dense rows, quantized rows) pairs");
    const int64_t tokens = x.size(0), q_size = num_heads_ * head_dim_, kv_size = num_kv_heads_ * head_dim_;
    for (const Layer& layer : layers_) {
      const torch::Tensor qkv = run(layer.qkv, rms_norm_bf16(x, layer.input_norm, eps_), row_splits);
      const torch::Tensor q = qkv.narrow(1, 0, q_size).reshape({tokens, num_heads_, head_dim_});
      const torch::Tensor k = qkv.narrow(1, q_size, kv_size).reshape({tokens, num_kv_heads_, head_dim_});
      const torch::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).reshape({tokens, num_kv_heads_, head_dim_});
      rope_bf16_(q, cos, sin);
      rope_bf16_(k, cos, sin);
      const torch::Tensor attn = attend(layer.cache, q, k, v, slot_mapping, block_tables, seq_lens);
      x = x + run(layer.o_proj, attn.reshape({tokens, q_size}), row_splits);
      x = x + run(layer.down, silu_mul_bf16(run(layer.gate_up, rms_norm_bf16(x, layer.post_norm, eps_), row_splits)),
                  row_splits);
    }
    return x;
  }

 private:
  // The step's K/V written at their slots (quantized per token into an int8 cache), then decode attention.
  torch::Tensor attend(const Cache& cache, const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                       const torch::Tensor& slot_mapping, const torch::Tensor& block_tables,
                       const torch::Tensor& seq_lens) const {
    const auto& c = cache.tensors;
    if (cache.int8) {
      quant_->write_rows_int8(k, slot_mapping, c[0], c[1]);
      quant_->write_rows_int8(v, slot_mapping, c[5], c[6]);
      return paged_decode_attention_int8(q, c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9], block_tables,
                                         seq_lens, scale_);
    }
    c[0].view({-1, num_kv_heads_, head_dim_}).index_copy_(0, slot_mapping, k);
    c[1].view({-1, num_kv_heads_, head_dim_}).index_copy_(0, slot_mapping, v);
    return paged_decode_attention(q, c[0], c[1], block_tables, seq_lens, scale_);
  }

  Linear checked_linear(const std::string& kernel, const std::vector<torch::Tensor>& operands, int64_t arg) const {
    Linear linear = make_linear(kernel, operands, arg);
    const bool from_quant = linear.kind == Linear::kW4A8 || linear.kind == Linear::kInt8Gemv ||
                            linear.kind == Linear::kInt8Dpbf16 || linear.kind == Linear::kInt4Dpbf16 ||
                            linear.kind == Linear::kW8A8Gemv;
    TORCH_CHECK(!from_quant || quant_ != nullptr, "kernel '", kernel, "' needs the quant extension");
    return linear;
  }

  // A dual-precision op's split rows, as DualPrecisionLinear.forward computes them.
  torch::Tensor run(const Op& op, const torch::Tensor& x, const std::vector<torch::Tensor>& row_splits) const {
    if (op.split < 0) return run(op.main, x);
    TORCH_CHECK(2 * op.split + 1 < static_cast<int64_t>(row_splits.size()), "row split ", op.split, " not given");
    const torch::Tensor& dense_rows = row_splits[2 * op.split];
    const torch::Tensor& quantized_rows = row_splits[2 * op.split + 1];
    torch::Tensor out;
    if (op.overwrite) {
      out = run(op.main, x);
    } else {
      const torch::Tensor quantized_out = run(op.main, x.index_select(0, quantized_rows));
      out = at::empty({x.size(0), quantized_out.size(1)}, quantized_out.options());
      out.index_copy_(0, quantized_rows, quantized_out);
    }
    return out.index_copy_(0, dense_rows, run(op.dense.front(), x.index_select(0, dense_rows)));
  }

  torch::Tensor run(const Linear& linear, const torch::Tensor& x) const {
    torch::Tensor out = run_kernel(linear, x);
    if (!linear.channel_index.defined()) return out;
    if (x.size(0) <= ember_gemv::kMaxTokens)
      return bf16_gemv_channels_(out.contiguous(), x, linear.channel_index, linear.channel_weight);
    return out + at::linear(x.index_select(1, linear.channel_index), linear.channel_weight);
  }

  torch::Tensor run_kernel(const Linear& linear, const torch::Tensor& x) const {
    const auto& w = linear.operands;
    switch (linear.kind) {
      case Linear::kW4A8:
        return quant_->w4a8_linear(x, w[0], w[1], w[2], optional_operand(w, 3), linear.arg);
      case Linear::kBf16Gemv:
        return bf16_gemv(x, w[0]);
      case Linear::kBf16Amx:
        return bf16_linear_amx(x, w[0], linear.arg);
      case Linear::kBf16Dpbf16:
        return bf16_linear_dpbf16(x, w[0], linear.arg);
      case Linear::kOneDnn:
        return onednn_linear(x, w[0]);
      case Linear::kInt8Gemv:
        return quant_->int8_gemv(x, w[0], w[1]);
      case Linear::kInt8Dpbf16:
        return quant_->int8_linear_dpbf16(x, w[0], w[1]);
      case Linear::kInt4Dpbf16:
        return quant_->int4_linear_dpbf16(x, w[0], w[1], w[2], linear.arg, optional_operand(w, 3),
                                          optional_operand(w, 4));
      case Linear::kInt4Packed:
        return at::_weight_int4pack_mm_for_cpu(x, w[0], linear.arg, w[1]);
      case Linear::kInt8Packed:
        return at::_weight_int8pack_mm(x, w[0], w[1]);
      case Linear::kW8A8Gemv:
        return quant_->w8a8_linear_gemv(x, w[0], w[1], w[2], optional_operand(w, 3));
    }
    TORCH_CHECK(false, "unknown linear kind");
  }

  int64_t num_heads_, num_kv_heads_, head_dim_;
  double eps_, scale_;
  const ember_quant_api::Table* quant_ = nullptr;
  std::vector<Layer> layers_;
};

}  // namespace

void register_decode_layers(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<DecodeLayers>(m, "DecodeLayers", "the decoder layers of one decode step in one native call")
      .def(py::init<int64_t, int64_t, int64_t, double, double, py::object>(), py::arg("num_heads"),
           py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("eps"), py::arg("scale"), py::arg("quant_api"))
      .def("add_layer", &DecodeLayers::add_layer, py::arg("input_norm"), py::arg("post_norm"), py::arg("cache"),
           py::arg("linears"), py::arg("halves") = std::vector<Half>{})
      .def("forward", &DecodeLayers::forward, py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("slot_mapping"),
           py::arg("block_tables"), py::arg("seq_lens"), py::arg("row_splits") = std::vector<torch::Tensor>{},
           py::call_guard<py::gil_scoped_release>());
}
