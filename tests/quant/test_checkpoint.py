"""Quantized checkpoint directory: save, load with no flags, identical outputs."""
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ember.quant.api import quantize_model
from ember.quant.checkpoint import QUANT_CONFIG_NAME, load_quantized, load_quantized_state, save_quantized
from ember.quant.config import QuantConfig
from ember.quant.linear import QuantLinear

from quant_models import make_tiny_llama

CONFIGS = [
    QuantConfig(method="rtn", bits=8),
    QuantConfig(method="rtn", bits=4, group_size=32, symmetric=False),
    QuantConfig(method="smoothquant", bits=8, act_bits=8, alpha=0.6,
                calibration={"source": "random ids", "num_samples": 8, "seq_len": 32}),
    QuantConfig(method="gptq", bits=4, group_size=64, rotate=True, method_args={"act_order": True},
                calibration={"source": "random ids", "num_samples": 8, "seq_len": 32}),
    QuantConfig(method="rtn", bits=4, group_size=64, act_bits=8),
    QuantConfig(method="rtn", bits=4, group_size=64, rotate=True, lm_head="int8"),  # the rotated head, quantized
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.method}-w{c.bits}a{c.act_bits or 16}-rot{int(c.rotate)}")
def test_save_load_round_trip(config, tmp_path, calib_batches):
    model = make_tiny_llama()
    names = quantize_model(model, config, calib_batches=calib_batches)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        expected = model(ids).logits
    save_quantized(model, tmp_path, config)

    payload = json.loads((tmp_path / QUANT_CONFIG_NAME).read_text())
    assert payload["method"] == config.method and payload["bits"] == config.bits
    assert payload["group_size"] == config.group_size and payload["symmetric"] == config.symmetric
    assert payload["quantized_modules"] == names

    loaded_config, loaded_names, state = load_quantized_state(tmp_path)
    assert loaded_config == config and loaded_names == names
    # a fresh skeleton from the saved config.json, different random weights
    skeleton = LlamaForCausalLM(LlamaConfig.from_json_file(str(tmp_path / "config.json"))).eval()
    assert load_quantized(skeleton, tmp_path) == config
    assert all(isinstance(skeleton.get_submodule(n), QuantLinear) for n in names)
    with torch.no_grad():
        torch.testing.assert_close(skeleton(ids).logits, expected, rtol=0, atol=0)


def test_tied_embedding_stored_once(tmp_path):
    model = make_tiny_llama(tied=True)
    config = QuantConfig(method="rtn", bits=8)
    quantize_model(model, config)
    save_quantized(model, tmp_path, config)
    payload = json.loads((tmp_path / QUANT_CONFIG_NAME).read_text())
    assert payload["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    _, _, state = load_quantized_state(tmp_path)
    assert torch.equal(state["lm_head.weight"], model.lm_head.weight)


def test_4bit_checkpoint_is_small(tmp_path):
    model = make_tiny_llama(tied=False)
    float_bytes = sum(m.weight.numel() * 4 for n, m in model.named_modules() if n.endswith("_proj"))
    config = QuantConfig(method="rtn", bits=4, group_size=64)
    quantize_model(model, config)
    packed = sum(m.qweight.numel() + m.scales.numel() * 4 for m in model.modules() if isinstance(m, QuantLinear))
    assert packed < float_bytes / 6  # 0.5 byte + 4/64 byte per weight vs 4 bytes


def test_unknown_config_key_rejected(tmp_path):
    model = make_tiny_llama()
    config = QuantConfig(method="rtn", bits=8)
    quantize_model(model, config)
    save_quantized(model, tmp_path, config)
    payload = json.loads((tmp_path / QUANT_CONFIG_NAME).read_text())
    payload["mystery"] = 1
    (tmp_path / QUANT_CONFIG_NAME).write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="mystery"):
        load_quantized_state(tmp_path)


@pytest.mark.parametrize("head,head_bits,head_act_bits", [("int8", 8, None), ("int4", 4, 8)])
def test_quantized_lm_head_gets_its_own_codes_and_the_tied_embedding_stays_float(tmp_path, head, head_bits,
                                                                                 head_act_bits):
    """--lm-head: the head of a tied model is untied and quantized (int8: per channel, weight-only even in a
    W4A8 checkpoint; int4: the body's scheme and activation codes); the embedding keeps its float weight, and
    the checkpoint loads into a fresh skeleton with the same logits."""
    model = make_tiny_llama(tied=True)
    embedding = model.model.embed_tokens.weight.detach().clone()
    config = QuantConfig(method="rtn", bits=4, group_size=32, symmetric=False, act_bits=8, lm_head=head)
    names = quantize_model(model, config)
    head_layer = model.lm_head
    assert "lm_head" in names and isinstance(head_layer, QuantLinear)
    assert head_layer.scheme.bits == head_bits and head_layer.act_bits == head_act_bits
    assert torch.equal(model.model.embed_tokens.weight, embedding) and not model.config.tie_word_embeddings
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        expected = model(ids).logits
        # the head's codes, dequantized, give the logits (weight-only: exactly F.linear's)
        hidden = model.model(ids).last_hidden_state
        if head_act_bits is None:
            torch.testing.assert_close(expected, torch.nn.functional.linear(hidden, head_layer.dequantize()),
                                       rtol=1e-5, atol=1e-5)
    save_quantized(model, tmp_path, config)
    payload = json.loads((tmp_path / QUANT_CONFIG_NAME).read_text())
    assert payload["lm_head"] == head and payload["module_precisions"]["lm_head"] == head and not payload["tied"]
    skeleton = LlamaForCausalLM(LlamaConfig.from_json_file(str(tmp_path / "config.json"))).eval()
    load_quantized(skeleton, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(skeleton(ids).logits, expected, rtol=0, atol=0)


def test_lm_head_precision_is_checked():
    with pytest.raises(ValueError, match="lm_head must be one of"):
        QuantConfig(method="rtn", bits=8, lm_head="int2")
    with pytest.raises(ValueError, match="bits=4"):
        QuantConfig(method="rtn", bits=8, lm_head="int4")
