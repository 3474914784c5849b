"""GPTQ keeping some input channels in float (`bf16_channels`): the update they take, the channels chosen, the
layer that adds them back, and checkpoints that load and generate like a float reference."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ember.kernels.linear.spec import WeightScheme
from ember.quant.api import quantize_model
from ember.quant.config import QuantConfig
from ember.quant.gptq import channel_saliency, gptq_quantize
from ember.quant.linear import QuantLinear

from quant_models import make_tiny_llama

SCHEME = WeightScheme(4, 32, True)


def _inputs(tokens: int = 512, cols: int = 128, seed: int = 0) -> torch.Tensor:
    """Correlated activations with a few loud channels, like a normed hidden state."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=gen) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=gen))
    x[:, :6] *= 12.0
    return x


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return (2.0 * x.T.double() @ x.double()) / x.shape[0]


def test_kept_channels_end_at_the_least_squares_update_of_the_quantized_ones():
    """Quantized last and never rounded, the kept columns must end where least squares puts them: for codes Q on
    the other columns, W_k + (W_q - Q) H_qk (H_kk + damp I)^-1 minimizes the damped output error (OBS)."""
    x = _inputs()
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(48, 128, generator=gen)
    hessian = _hessian(x)
    keep = torch.tensor([3, 17, 40, 41, 99, 127])
    result = gptq_quantize(weight, hessian, SCHEME, percdamp=0.01, act_order=True, keep_channels=keep)
    assert torch.equal(result.channel_index, keep)
    codes_part = result.dequantize()
    codes_part[:, keep] = 0.0  # symmetric: the kept columns' codes are the code of 0
    kept = torch.zeros(128, dtype=torch.bool)
    kept[keep] = True
    torch.testing.assert_close(result.dequantize()[:, ~kept], codes_part[:, ~kept], rtol=0, atol=0)
    assert torch.equal(result.codes()[:, keep], torch.full((48, len(keep)), 8, dtype=torch.int16))

    damp = 0.01 * torch.diagonal(hessian).mean()
    h_qk, h_kk = hessian[~kept][:, kept], hessian[kept][:, kept] + damp * torch.eye(len(keep), dtype=hessian.dtype)
    error = (weight[:, ~kept] - codes_part[:, ~kept]).double()
    expected = weight[:, kept].double() + torch.linalg.solve(h_kk, (error @ h_qk).T).T
    torch.testing.assert_close(result.channel_weight.double(), expected, rtol=0, atol=2e-4)


def test_asymmetric_codes_keep_what_their_zero_code_leaves_in_the_float_part():
    x = _inputs()
    weight = torch.randn(32, 128, generator=torch.Generator().manual_seed(2))
    keep = torch.tensor([0, 5, 64])
    scheme = WeightScheme(4, 32, False)
    result = gptq_quantize(weight, _hessian(x), scheme, act_order=True, keep_channels=keep)
    full = result.dequantize()
    codes_only = result.dequantize()
    codes_only.index_add_(1, keep, -result.channel_weight)
    # the float part is the kept value minus whatever the codes give there: together they are the kept value
    torch.testing.assert_close(full[:, keep], codes_only[:, keep] + result.channel_weight, rtol=0, atol=1e-6)
    assert not torch.equal(codes_only[:, keep], torch.zeros(32, 3))  # asymmetric grids need not hold 0


def test_salient_channels_cut_the_output_error_more_than_random_ones():
    x = _inputs(seed=3)
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(4))
    hessian = _hessian(x)

    def output_error(keep):
        approx = gptq_quantize(weight, hessian, SCHEME, act_order=True, keep_channels=keep).dequantize()
        return ((x @ (weight - approx).T) ** 2).mean().item()

    count = 12
    salient = torch.topk(channel_saliency([weight], hessian), count).indices
    randoms = [torch.randperm(128, generator=torch.Generator().manual_seed(s))[:count] for s in range(3)]
    none = output_error(None)
    assert output_error(salient) < 0.5 * none
    assert all(output_error(salient) < output_error(r) < none for r in randoms)


def test_quant_linear_adds_its_float_channels_and_fuses_different_sets():
    x = _inputs(tokens=7)
    gen = torch.Generator().manual_seed(5)
    parts = []
    for rows, keep in ((16, [1, 9, 100]), (8, [9, 50]), (8, None)):
        weight = torch.randn(rows, 128, generator=gen)
        index = None if keep is None else torch.tensor(keep)
        parts.append(QuantLinear.from_quantized(gptq_quantize(weight, _hessian(x), SCHEME, act_order=True,
                                                              keep_channels=index)))
    for layer in parts:
        torch.testing.assert_close(layer(x), F.linear(x, layer.dequantize()), rtol=1e-5, atol=1e-4)
    fused = QuantLinear.concat(parts)
    assert fused.channel_index.tolist() == [1, 9, 50, 100]
    torch.testing.assert_close(fused(x), torch.cat([layer(x) for layer in parts], dim=1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(fused.dequantize(), torch.cat([layer.dequantize() for layer in parts]))
    # in bfloat16, every kernel the policy picks (the channels added after it, or written into its panels where
    # int4_dpbf16 runs): a union column that a part does not keep holds that part's codes and a zero float part
    fused_bf16 = fused.to(torch.bfloat16)
    reference = fused_bf16.dequantize().double()
    for tokens in (1, 4, 5, 13, 70):
        x16 = x[:tokens].bfloat16()
        exact = x16.double() @ reference.T
        bound = 2 ** -7 * exact.abs() + 2 ** -8 * (x16.double().abs() @ reference.abs().T)
        assert bool(((fused_bf16(x16).double() - exact).abs() <= bound).all()), tokens


def test_linears_sharing_an_input_keep_one_set_of_their_most_salient_channels(calib_batches):
    model = make_tiny_llama()  # hidden 128, intermediate 256
    quantize_model(model, QuantConfig(method="gptq", bits=4, group_size=64, bf16_channels=0.1),
                   calib_batches=calib_batches)
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    assert attn.q_proj.channel_index.numel() == 12 and mlp.down_proj.channel_index.numel() == 25
    assert torch.equal(attn.q_proj.channel_index, attn.v_proj.channel_index)  # one choice per shared input
    assert torch.equal(mlp.gate_proj.channel_index, mlp.up_proj.channel_index)
    assert set(range(4)) <= set(attn.q_proj.channel_index.tolist())  # the loud normed channels (quant_models)
    assert set(range(4)) <= set(mlp.gate_proj.channel_index.tolist())
    randomly = make_tiny_llama()
    quantize_model(randomly, QuantConfig(method="gptq", bits=4, group_size=64, bf16_channels=0.1,
                                         method_args={"channel_order": "random"}), calib_batches=calib_batches)
    other = randomly.model.layers[1].self_attn.q_proj.channel_index
    assert other.numel() == 12 and not torch.equal(other, attn.q_proj.channel_index)


@pytest.mark.parametrize("split", [{"down_proj": 2.0, "gate_up_proj": 0.5}, {"down_proj": 3.0}])
def test_channel_split_shares_each_layers_float_bytes_by_op_weight(calib_batches, split):
    # tiny Llama: q/k/v 256 x 128, o 128 x 128, gate/up 512 x 128, down 128 x 256
    shapes = {"qkv_proj": (256, 128), "o_proj": (128, 128), "gate_up_proj": (512, 128), "down_proj": (128, 256)}
    params = {op: n * k for op, (n, k) in shapes.items()}
    scale = sum(params.values()) / sum(split.get(op, 1.0) * params[op] for op in shapes)
    expected = {op: int(scale * split.get(op, 1.0) * 0.1 * k) for op, (n, k) in shapes.items()}
    assert sum(expected[op] * n for op, (n, k) in shapes.items()) <= 0.1 * sum(params.values())
    for order in ("saliency", "random"):
        model = make_tiny_llama()
        quantize_model(model, QuantConfig(method="gptq", bits=4, group_size=64, bf16_channels=0.1,
                                          method_args={"channel_split": split, "channel_order": order}),
                       calib_batches=calib_batches)
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            counts = {"qkv_proj": attn.q_proj.channel_index.numel(), "o_proj": attn.o_proj.channel_index.numel(),
                      "gate_up_proj": mlp.up_proj.channel_index.numel(),
                      "down_proj": mlp.down_proj.channel_index.numel()}
            assert counts == expected, order
            assert torch.equal(attn.q_proj.channel_index, attn.k_proj.channel_index)
    assert expected["down_proj"] > int(0.1 * 256)  # the split moved bytes to down_proj


def test_bad_channel_settings_are_refused():
    with pytest.raises(ValueError, match="gptq"):
        QuantConfig(method="rtn", bits=4, group_size=64, bf16_channels=0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        QuantConfig(method="gptq", bits=4, group_size=64, bf16_channels=1.0)
    with pytest.raises(ValueError, match="channel_order"):
        QuantConfig(method="gptq", bits=4, group_size=64, bf16_channels=0.1, method_args={"channel_order": "x"})
    with pytest.raises(ValueError, match="set bf16_channels"):
        QuantConfig(method="gptq", bits=4, group_size=64, method_args={"channel_split": {"down_proj": 2.0}})
    with pytest.raises(ValueError, match="among"):
        QuantConfig(method="gptq", bits=4, group_size=64, bf16_channels=0.1, method_args={"channel_split": {"mlp": 2}})
    with pytest.raises(ValueError, match="positive"):
        QuantConfig(method="gptq", bits=4, group_size=64, bf16_channels=0.1,
                    method_args={"channel_split": {"down_proj": 0}})


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_checkpoint_with_float_channels_generates_like_hf_holding_the_dequantized_weights(
        tiny_llama_dir, tmp_path, dtype):
    """The reference is a plain Hugging Face model whose linears hold the dequantized weights (codes and float
    channels together): float32 gives its greedy tokens, bfloat16 (q/k/v and gate/up fused, union of channels)
    its logprobs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ember import LLM, SamplingParams
    from ember.quant.checkpoint import save_quantized

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, 512, (2, 48), generator=gen) for _ in range(4)]
    config = QuantConfig(method="gptq", bits=4, group_size=32, bf16_channels=0.25)
    quantize_model(hf, config, calib_batches=batches)
    save_quantized(hf, tmp_path, config)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, module in hf.named_modules():
            if isinstance(module, QuantLinear):
                assert module.channel_index.numel() == module.in_features // 4
                target = reference.get_submodule(name)
                assert isinstance(target, nn.Linear)
                target.weight.copy_(module.dequantize())

    llm = LLM(model=str(tmp_path), dtype=dtype, num_kv_blocks=64, max_model_len=256)
    prompt = list(range(30, 70))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].outputs[0]
    if dtype == "float32":
        with torch.inference_mode():
            expected = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert out.token_ids == expected
        return
    layer = llm.engine.runner.model.model.layers[0]
    assert layer.self_attn.qkv_proj.channel_weight.dtype == torch.bfloat16
    with torch.inference_mode():
        logits = reference(torch.tensor([prompt + out.token_ids[:-1]])).logits[0, len(prompt) - 1:]
    expected = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(out.token_ids)[:, None]).squeeze(1)
    ours = torch.tensor([step[token].logprob for step, token in zip(out.logprobs, out.token_ids)])
    torch.testing.assert_close(ours, expected, rtol=0, atol=0.02)  # bf16 against float32, as the fused test
