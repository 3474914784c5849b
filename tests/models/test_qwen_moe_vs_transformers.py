"""Qwen2, Qwen3, Mixtral, Qwen2-MoE and Qwen3-MoE against `transformers` on the same random tiny weights.

Hugging Face initialises biases to zero and norms to one; they are randomised here so that a missing
bias or q/k norm changes the logits.
"""

import pytest
import torch

from ember.loader.model_loader import build_model, load_state

from .test_llama_vs_transformers import assert_greedy_matches, prefill_logits

SHAPES = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1,
              eos_token_id=2)


def _hf_config(kind: str):
    import transformers as tf

    if kind == "qwen2":
        return tf.Qwen2Config(**SHAPES)
    if kind == "qwen3":  # head_dim != hidden / heads, as in the real Qwen3 models
        return tf.Qwen3Config(**SHAPES, head_dim=32)
    if kind == "mixtral":
        return tf.MixtralConfig(**SHAPES, num_local_experts=4, num_experts_per_tok=2)
    if kind == "qwen2_moe":  # a shared expert, unnormalised top-k, one dense layer between sparse ones
        return tf.Qwen2MoeConfig(**SHAPES, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
                                 shared_expert_intermediate_size=80, norm_topk_prob=False, mlp_only_layers=[1])
    return tf.Qwen3MoeConfig(**SHAPES, head_dim=32, num_experts=8, num_experts_per_tok=3,
                             moe_intermediate_size=32, norm_topk_prob=True, decoder_sparse_step=2)


KINDS = ["qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe"]


@pytest.fixture(scope="module", params=KINDS)
def tiny_checkpoint(request, tmp_path_factory, save_tiny_checkpoint):
    """(path, reference model in float32) of one random tiny checkpoint."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(KINDS.index(request.param))
    model = AutoModelForCausalLM.from_config(_hf_config(request.param))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.5)
            elif "norm" in name:
                param.normal_(1.0, 0.2)
    path = save_tiny_checkpoint(model, tmp_path_factory.mktemp(request.param))
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_logits_match_transformers(tiny_checkpoint):
    path, reference = tiny_checkpoint
    config, state = load_state(path)
    model = build_model(config, state, torch.float32)
    token_ids = torch.randint(3, config.vocab_size, (1, 97), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = reference(token_ids).logits[0]
    ours = prefill_logits(model, config, token_ids[0].tolist())
    assert (ours - expected).abs().max().item() < 1e-3


def test_greedy_with_chunked_prefill_matches_generate(tiny_checkpoint):
    """Batched decode (experts see tokens of several requests at once) and prompts prefilled in chunks."""
    from ember import LLM

    path, reference = tiny_checkpoint
    llm = LLM(model=path, dtype="float32", max_model_len=256, num_kv_blocks=64, max_num_batched_tokens=24)
    gen = torch.Generator().manual_seed(2)
    assert_greedy_matches(llm, reference, [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (5, 40, 71)],
                          max_tokens=24)


def test_bfloat16_fuses_biased_projections_and_stays_close(tiny_checkpoint):
    """bfloat16 stacks q/k/v (with their biases) and gate/up; its logits stay near float32's."""
    path, _ = tiny_checkpoint
    config, state = load_state(path)
    fp32 = build_model(config, state, torch.float32)
    bf16 = build_model(config, state, torch.bfloat16)
    assert bf16.model.layers[0].self_attn.qkv_proj is not None
    token_ids = torch.randint(3, config.vocab_size, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    expected = prefill_logits(fp32, config, token_ids)
    got = prefill_logits(bf16, config, token_ids, dtype=torch.bfloat16)
    cosine = torch.nn.functional.cosine_similarity(got.float(), expected, dim=-1)
    assert cosine.min().item() > 0.99
