"""A quantized checkpoint directory loads with no flags and generates like the quantized reference."""

import json

import pytest
import torch

from ember import LLM, SamplingParams


@pytest.mark.parametrize("settings", [dict(method="rtn", bits=8), dict(method="rtn", bits=4, group_size=32,
                                                                           symmetric=False),
                                      dict(method="rtn", bits=4, group_size=32, symmetric=False, lm_head="int8"),
                                      dict(method="rtn", bits=4, group_size=32, symmetric=False, lm_head="int4")])
def test_llm_loads_quantized_dir_and_matches_hf_with_same_layers(tiny_llama_dir, tmp_path, settings):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ember.quant.api import quantize_model
    from ember.quant.checkpoint import save_quantized
    from ember.quant.config import QuantConfig

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    config = QuantConfig(**settings)
    quantize_model(hf, config)
    out_dir = tmp_path / "quantized"
    save_quantized(hf, out_dir, config)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(out_dir)
    assert json.loads((out_dir / "quantization_config.json").read_text())["bits"] == settings["bits"]

    llm = LLM(model=str(out_dir), dtype="float32", num_kv_blocks=64, max_model_len=256)
    if "lm_head" in settings:  # the head runs its own codes; the embedding stays float
        from ember.quant.linear import QuantLinear

        model = llm.engine.runner.model
        assert isinstance(model.lm_head, QuantLinear) and isinstance(hf.lm_head, QuantLinear)
        assert torch.equal(model.model.embed_tokens.weight, hf.model.embed_tokens.weight)
    prompt = list(range(30, 70))
    ours = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].token_ids
    with torch.inference_mode():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == expected


@pytest.mark.parametrize("settings", [dict(method="rtn", bits=8), dict(method="rtn", bits=4, group_size=32,
                                                                           symmetric=False)])
def test_bfloat16_fuses_quantized_projections_and_scores_like_hf(tiny_llama_dir, tmp_path, settings):
    """In bfloat16 q/k/v and gate/up become one QuantLinear each; each generated token's logprob
    matches the float32 Hugging Face model holding the same quantized layers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ember.quant.api import quantize_model
    from ember.quant.checkpoint import save_quantized
    from ember.quant.config import QuantConfig
    from ember.quant.linear import QuantLinear

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    config = QuantConfig(**settings)
    quantize_model(hf, config)
    save_quantized(hf, tmp_path, config)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(tmp_path)

    llm = LLM(model=str(tmp_path), dtype="bfloat16", num_kv_blocks=64, max_model_len=256)
    layer = llm.engine.runner.model.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, QuantLinear) and isinstance(layer.mlp.gate_up_proj, QuantLinear)
    prompt = list(range(30, 70))
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                                    logprobs=0), use_tqdm=False)[0].outputs[0]
    with torch.inference_mode():
        logits = hf(torch.tensor([prompt + out.token_ids[:-1]])).logits[0, len(prompt) - 1:]
    expected = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(out.token_ids)[:, None]).squeeze(1)
    ours = torch.tensor([step[token].logprob for step, token in zip(out.logprobs, out.token_ids)])
    # bfloat16 activations and KV against float32: measured up to 0.0024 here; a wrong fusion is off by >1
    torch.testing.assert_close(ours, expected, rtol=0, atol=0.02)
