"""Mixed-precision plans: per-linear precisions in QuantConfig, their checkpoints, and op byte accounting."""
import json

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from ember.quant.api import quantize_model
from ember.quant.checkpoint import QUANT_CONFIG_NAME, load_quantized, save_quantized
from ember.quant.config import QuantConfig
from ember.quant.linear import QuantLinear
from ember.quant.plan import (OpRef, budget_plan, decoder_ops, linear_precisions, op_shapes, op_weight_bytes,
                              parse_op_key, random_plan)

from quant_models import make_tiny_llama

PLAN = {OpRef(0, "down_proj"): "bf16", OpRef(1, "qkv_proj"): "int8", OpRef(1, "o_proj"): "bf16"}


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_precisions_pick_each_linears_scheme(method, calib_batches):
    model = make_tiny_llama()
    float_weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    config = QuantConfig(method=method, bits=4, group_size=64, precisions=linear_precisions(PLAN),
                         calibration={"source": "random ids"})
    names = quantize_model(model, config, calib_batches=calib_batches)
    for name in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj"):
        kept = model.get_submodule(name)
        assert type(kept) is nn.Linear and name not in names
        if method != "awq":  # AWQ folds scales into neighbours of kept ops: o_proj is scaled with v_proj only under MHA
            assert torch.equal(kept.weight, float_weights[name])
    for name in OpRef(1, "qkv_proj").linear_names():
        assert model.get_submodule(name).scheme.bits == 8 and model.get_submodule(name).scheme.group_size is None
    assert model.get_submodule("model.layers.0.mlp.gate_proj").scheme.bits == 4
    assert len(names) == 2 * 7 - 2


def test_mixed_checkpoint_round_trip(tmp_path):
    model = make_tiny_llama()
    config = QuantConfig(method="rtn", bits=4, group_size=64, precisions=linear_precisions(PLAN))
    quantize_model(model, config)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        expected = model(ids).logits
    save_quantized(model, tmp_path, config)
    payload = json.loads((tmp_path / QUANT_CONFIG_NAME).read_text())
    precisions = payload["module_precisions"]
    assert precisions["model.layers.0.mlp.down_proj"] == "bf16" and precisions["model.layers.1.self_attn.q_proj"] == "int8"
    assert precisions["model.layers.0.mlp.up_proj"] == "int4" and len(precisions) == 14
    skeleton = LlamaForCausalLM(LlamaConfig.from_json_file(str(tmp_path / "config.json"))).eval()
    assert load_quantized(skeleton, tmp_path) == config
    assert type(skeleton.get_submodule("model.layers.1.self_attn.o_proj")) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(skeleton(ids).logits, expected, rtol=0, atol=0)


def test_bad_precisions_are_refused():
    with pytest.raises(ValueError, match="precisions"):
        QuantConfig(bits=4, group_size=64, precisions={"model.layers.0.mlp.down_proj": "fp8"})
    with pytest.raises(ValueError, match="weight-only"):
        QuantConfig(bits=4, group_size=64, act_bits=8, precisions={"model.layers.0.mlp.down_proj": "bf16"})
    with pytest.raises(ValueError, match="op"):
        OpRef(0, "q_proj")
    assert parse_op_key("12.down_proj") == OpRef(12, "down_proj") and parse_op_key("lm_head").layer is None


@pytest.mark.parametrize("precision,bits,group", [("int4", 4, 64), ("int8", 8, None)])
def test_op_bytes_equal_the_quantized_buffers(precision, bits, group):
    model = make_tiny_llama()
    dims = [s for shapes in op_shapes(model, [OpRef(0, "gate_up_proj")]).values() for s in shapes]
    quantize_model(model, QuantConfig(method="rtn", bits=bits, group_size=group))
    layer = model.model.layers[0].mlp
    stored = sum(m.qweight.nbytes + m.scales.nbytes for m in (layer.gate_proj, layer.up_proj))
    assert dims == [(m.out_features, m.in_features) for m in (layer.gate_proj, layer.up_proj)]
    assert op_weight_bytes(dims, precision, 64) == stored
    assert op_weight_bytes(dims, "bf16") == sum(2 * n * k for n, k in dims)
    assert isinstance(layer.gate_proj, QuantLinear)


def test_budget_and_random_plans():
    model = make_tiny_llama(layers=4)
    ops = decoder_ops(4)
    shapes = op_shapes(model, ops)
    total = sum(op_weight_bytes(s, "bf16") for s in shapes.values())
    ranking = list(reversed(ops))
    chosen = budget_plan(ranking, shapes, 0.25)
    used = sum(op_weight_bytes(shapes[r], "bf16") for r in chosen)
    assert used <= 0.25 * total and chosen[0] == ranking[0]
    skipped = [r for r in ranking if r not in chosen]
    assert all(used + op_weight_bytes(shapes[r], "bf16") > 0.25 * total for r in skipped)  # nothing else fits
    controls = [random_plan(ops, shapes, used, seed) for seed in range(3)]
    assert controls[0] == random_plan(ops, shapes, used, 0) and len({tuple(c) for c in controls}) > 1
    assert all(sum(op_weight_bytes(shapes[r], "bf16") for r in c) <= used for c in controls)
    assert budget_plan(ranking, shapes, 0.0) == [] and budget_plan(ranking, shapes, 1.0) == ranking
    with pytest.raises(ValueError, match="fraction"):
        budget_plan(ranking, shapes, 1.5)


def test_fallback_copies_round_trip_and_follow_the_dtype(tmp_path):
    model = make_tiny_llama()
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj",
             "model.layers.1.mlp.down_proj"]
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    config = QuantConfig(method="gptq", bits=4, group_size=64, fallback_modules=tuple(names))
    quantize_model(model, config, calib_batches=[torch.randint(0, 256, (1, 32))])
    save_quantized(model, tmp_path, config)
    assert json.loads((tmp_path / QUANT_CONFIG_NAME).read_text())["fallback_modules"] == names
    skeleton = LlamaForCausalLM(LlamaConfig.from_json_file(str(tmp_path / "config.json"))).eval()
    load_quantized(skeleton, tmp_path)
    for name in names:
        assert torch.equal(skeleton.get_submodule(name).fallback_weight, originals[name])
    assert skeleton.get_submodule("model.layers.0.mlp.down_proj").fallback_weight is None
    fused = QuantLinear.concat([skeleton.get_submodule(n) for n in names[:3]])
    assert torch.equal(fused.fallback_weight, torch.cat([originals[n] for n in names[:3]]))
    layer = skeleton.get_submodule(names[-1]).to(torch.bfloat16)
    assert layer.fallback_weight.dtype == torch.bfloat16 and layer.scales.dtype == torch.float32
