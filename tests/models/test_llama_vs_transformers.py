"""Numerics of the Llama model against Hugging Face transformers on the same weights."""

import torch

from ember.attention.layer_cache import KVCacheSpec, create_layer_caches
from ember.attention.metadata import AttentionMetadata, PrefillChunk
from ember.loader.model_loader import build_model, load_state


def prefill_logits(model, config, token_ids: list[int], block_size: int = 16,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Run one fresh prompt through the paged model (built in `dtype`); return logits at every position."""
    num_tokens = len(token_ids)
    num_blocks = -(-num_tokens // block_size)
    spec = KVCacheSpec("auto", dtype, config.num_hidden_layers, config.num_key_value_heads, config.head_dim,
                       block_size)
    caches = create_layer_caches(spec, num_blocks)
    meta = AttentionMetadata(slot_mapping=torch.arange(num_tokens), num_decode_tokens=0,
                             decode_block_tables=None, decode_seq_lens=None,
                             prefills=[PrefillChunk(0, num_tokens, 0, torch.arange(num_blocks), None)])
    with torch.inference_mode():
        hidden = model(torch.tensor(token_ids), torch.arange(num_tokens), caches, meta)
        return model.compute_logits(hidden)


def hf_greedy_ids(reference, prompt: list[int], max_new_tokens: int) -> list[int]:
    """`transformers`' greedy continuation of `prompt` alone (EOS not special)."""
    with torch.inference_mode():
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def assert_greedy_matches(llm, reference, prompts: list[list[int]], max_tokens: int) -> None:
    """Ember's greedy tokens for `prompts`, run as one batch, equal the reference's for each prompt alone."""
    from ember import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy_ids(reference, prompt, max_tokens), len(prompt)


def test_tiny_random_llama_logits_match(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    config, state = load_state(tiny_llama_dir)
    model = build_model(config, state, torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    token_ids = torch.randint(3, config.vocab_size, (1, 97), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = reference(token_ids).logits[0]
    ours = prefill_logits(model, config, token_ids[0].tolist())
    assert (ours - expected).abs().max().item() < 1e-3


def test_tiny_random_llama_greedy_matches_generate(tiny_llama_dir):
    """Decode path (paged gather, chunked prefill) against transformers' generate."""
    from transformers import AutoModelForCausalLM

    from ember import LLM

    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    llm = LLM(model=tiny_llama_dir, dtype="float32", max_model_len=256, num_kv_blocks=64,
              max_num_batched_tokens=24)  # forces prompts to be prefilled in chunks
    gen = torch.Generator().manual_seed(2)
    assert_greedy_matches(llm, reference, [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (5, 40, 71)],
                          max_tokens=24)


PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
]


def test_bundled_model_greedy_matches_transformers(bundled_gguf, bundled_llm_fp32):
    """64 greedy tokens on 5 prompts equal transformers on the same dequantized GGUF weights."""
    import os

    from transformers import AutoModelForCausalLM

    from ember import SamplingParams

    folder, name = os.path.split(bundled_gguf)
    reference = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tokenizer = bundled_llm_fp32.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    outputs = bundled_llm_fp32.generate(PROMPTS, params, use_tqdm=False)
    for prompt, output in zip(PROMPTS, outputs):
        prompt_ids = tokenizer.encode(prompt)
        assert output.prompt_token_ids == prompt_ids
        with torch.inference_mode():
            expected = reference.generate(torch.tensor([prompt_ids]), max_new_tokens=64, do_sample=False,
                                          eos_token_id=None, pad_token_id=0)[0, len(prompt_ids):]
        assert output.outputs[0].token_ids == expected.tolist(), prompt
