"""DualPrecisionLinear against its own halves, the per-step PrecisionMask, and attaching float copies to
a loaded quantized model (float32 unfused, bfloat16 fused)."""

import pytest
import torch
from torch import nn

from ember.kernels.linear.spec import WeightScheme
from ember.models.layers.linear import DenseLinear
from ember.models.layers.precision import (DualPrecisionLinear, PrecisionMask, apply_linear,
                                           attach_fallback_copies, dual_layers)
from ember.quant.linear import QuantLinear
from ember.quant.rtn import quantize_weight

OPS = frozenset({"layer"})


def make_dual(in_features=64, out_features=48, seed=0) -> DualPrecisionLinear:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=False)
    quantized = QuantLinear.from_quantized(quantize_weight(linear.weight.detach(), WeightScheme(4, 32)))
    return DualPrecisionLinear(quantized, DenseLinear(linear), "layer")


def mask_of(rows: list[bool], ops=OPS) -> PrecisionMask | None:
    flags = torch.tensor(rows)
    return PrecisionMask.from_spans(len(rows), [(ops, i, i + 1) for i in range(len(rows)) if flags[i]])


def test_no_dense_row_is_the_quantized_layer_bit_for_bit():
    layer = make_dual()
    x = torch.randn(7, 64)
    expected = layer.quantized(x)
    assert torch.equal(layer(x), expected)
    assert torch.equal(layer(x, None), expected)
    assert mask_of([False] * 7) is None  # the runner passes None: no split at all
    other_op = mask_of([True] * 7, frozenset({"another.layer"}))
    assert torch.equal(layer(x, other_op), expected)  # rows flagged for ops this layer is not


def test_all_dense_rows_are_the_dense_layer():
    layer = make_dual()
    x = torch.randn(5, 64)
    out = layer(x, mask_of([True] * 5))
    assert torch.equal(out, layer.dense(x))
    assert not torch.equal(out, layer.quantized(x))  # int4 really differs


@pytest.mark.parametrize("rows", [[True, False, False, True, False, True], [False, True], [True, False],
                                  [True, True, False, True, True, False]])
def test_mixed_mask_gives_each_row_its_own_half(rows):
    layer = make_dual(seed=1)
    x = torch.randn(len(rows), 64)
    out = layer(x, mask_of(rows))
    dense_idx = torch.tensor([i for i, r in enumerate(rows) if r])
    quant_idx = torch.tensor([i for i, r in enumerate(rows) if not r])
    assert torch.equal(out[dense_idx], layer.dense(x[dense_idx]))  # the dense half ran on exactly its rows
    if len(dense_idx) <= len(quant_idx):  # the quantized half ran on every row: its rows as with no dense row
        assert torch.equal(out[quant_idx], layer.quantized(x)[quant_idx])
    else:
        assert torch.equal(out[quant_idx], layer.quantized(x[quant_idx]))
    for i, is_dense in enumerate(rows):  # each row is what its half gives the row alone
        half = layer.dense if is_dense else layer.quantized
        torch.testing.assert_close(out[i:i + 1], half(x[i:i + 1]), rtol=0, atol=1e-6)


def test_mask_groups_ops_and_selects_rows():
    a, b = frozenset({"x", "y"}), frozenset({"y"})
    mask = PrecisionMask.from_spans(6, [(a, 0, 2), (b, 4, 6), (frozenset(), 2, 4)])
    assert mask.split_for("z") is None
    x_split = mask.split_for("x")
    assert x_split.dense_rows.tolist() == [0, 1] and x_split.quantized_rows.tolist() == [2, 3, 4, 5]
    assert x_split.overwrite  # 2 dense rows of 6: the quantized half runs every row
    assert mask.split_for("y").dense_rows.tolist() == [0, 1, 4, 5] and not mask.split_for("y").overwrite
    assert mask.split_for("y") is mask.split_for("y")  # computed once per step
    head = mask.select([1, 3, 5])
    assert head.split_for("x").dense_rows.tolist() == [0] and head.split_for("y").dense_rows.tolist() == [0, 2]
    assert mask.select([2, 3]) is None


def test_apply_linear_passes_the_mask_to_dual_layers_only():
    layer, plain = make_dual(), nn.Linear(64, 8, bias=False)
    x = torch.randn(3, 64)
    mask = mask_of([True, True, True])
    assert torch.equal(apply_linear(plain, x, mask), plain(x))
    assert torch.equal(apply_linear(layer, x, mask), layer.dense(x))


def test_attach_float32_keeps_layers_apart_and_rejects_bad_names(dual_precision_checkpoint):
    from ember.loader.model_loader import load_model

    ckpt = dual_precision_checkpoint
    model, _ = load_model(ckpt.path, torch.float32)
    before = dict(model.named_modules())
    with pytest.raises(ValueError, match="no quantized linear"):
        attach_fallback_copies(model, {**ckpt.float_weights, "model.layers.9.mlp.down_proj": torch.zeros(1)},
                               torch.float32)
    with pytest.raises(ValueError, match="shape"):
        attach_fallback_copies(model, {"model.layers.0.mlp.down_proj": torch.zeros(3, 3)}, torch.float32)
    assert dict(model.named_modules()) == before  # nothing changed
    weights = {f"{n}.weight": w for n, w in ckpt.float_weights.items()}
    assert attach_fallback_copies(model, weights, torch.float32) == 14
    assert attach_fallback_copies(model, weights, torch.float32) == 0  # already dual
    layer = model.get_submodule("model.layers.1.self_attn.k_proj")
    assert isinstance(layer, DualPrecisionLinear) and isinstance(layer.quantized, QuantLinear)
    assert torch.equal(layer.dense.weight, ckpt.float_weights["model.layers.1.self_attn.k_proj"])
    assert "model.layers.1.self_attn.qkv_proj" in layer.match_names


def test_attach_bfloat16_wraps_the_fused_layers(dual_precision_checkpoint):
    """In bfloat16 q/k/v and gate/up were fused before the copies arrive: the dual layer's dense half is
    the concatenation of the parts' float weights, and all parts are needed."""
    from ember.loader.model_loader import load_model

    ckpt = dual_precision_checkpoint
    model, _ = load_model(ckpt.path, torch.bfloat16)
    partial = {"model.layers.0.self_attn.q_proj": ckpt.float_weights["model.layers.0.self_attn.q_proj"]}
    with pytest.raises(ValueError, match="missing"):
        attach_fallback_copies(model, partial, torch.bfloat16)
    assert attach_fallback_copies(model, ckpt.float_weights, torch.bfloat16) == 8  # qkv, o, gate_up, down in 2 layers
    assert sorted(dual_layers(model))[:2] == ["model.layers.0.mlp.down_proj",
                                              "model.layers.0.mlp.gate_up_proj"]
    qkv = model.get_submodule("model.layers.0.self_attn.qkv_proj")
    parts = [ckpt.float_weights[f"model.layers.0.self_attn.{p}_proj"] for p in "qkv"]
    assert torch.equal(qkv.dense.weight, torch.cat(parts).to(torch.bfloat16))
    assert "model.layers.0.self_attn.v_proj" in qkv.match_names
    x = torch.randn(4, 64).to(torch.bfloat16)
    mask = PrecisionMask.from_spans(4, [(frozenset({qkv.op_name}), 1, 3)])
    out = qkv(x, mask)
    assert torch.equal(out[1:3], qkv.dense(x[1:3])) and torch.equal(out[[0, 3]], qkv.quantized(x[[0, 3]]))


def test_attach_takes_a_fused_layers_stacked_copy_under_its_own_name(dual_precision_checkpoint):
    from ember.loader.model_loader import load_model

    ckpt = dual_precision_checkpoint
    model, _ = load_model(ckpt.path, torch.bfloat16)
    gate_up = torch.cat([ckpt.float_weights[f"model.layers.1.mlp.{p}_proj"] for p in ("gate", "up")])
    stacked = gate_up.to(torch.bfloat16)
    assert attach_fallback_copies(model, {"model.layers.1.mlp.gate_up_proj": stacked}, torch.bfloat16) == 1
    layer = model.get_submodule("model.layers.1.mlp.gate_up_proj")
    assert layer.dense.weight.data_ptr() == stacked.data_ptr()  # shared, not copied
    assert "model.layers.1.mlp.up_proj" in layer.match_names
