"""Prompt logprobs (vLLM semantics) against Hugging Face transformers on the same weights."""

import pytest
import torch

from ember import LLM, SamplingParams
from ember.kv_cache.kv_cache_manager import KVCacheManager
from ember.request import Request

TOLERANCE = 1e-4  # float32 engine vs float32 transformers, absolute, in nats


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


def hf_logprobs(model, prompt: list[int]) -> torch.Tensor:
    """[len(prompt) - 1, vocab]: row i is log p(. | prompt[:i + 1]), the distribution of prompt[i + 1]."""
    with torch.inference_mode():
        logits = model(torch.tensor([prompt])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


def check_against(expected: torch.Tensor, prompt: list[int], prompt_logprobs, k: int, tokenizer=None) -> float:
    """Assert vLLM's shape and values; return the largest absolute logprob difference."""
    assert len(prompt_logprobs) == len(prompt) and prompt_logprobs[0] is None
    worst = 0.0
    for i, entry in enumerate(prompt_logprobs[1:], start=1):
        row, actual = expected[i - 1], prompt[i]
        top_ids = row.topk(k).indices.tolist()
        assert set(entry) == {actual, *top_ids}
        assert entry[actual].rank == int((row >= row[actual]).sum())
        for rank, token_id in enumerate(top_ids, start=1):
            if token_id != actual:
                assert entry[token_id].rank == rank
        for token_id, logprob in entry.items():
            worst = max(worst, abs(logprob.logprob - row[token_id].item()))
            if tokenizer is not None:
                assert logprob.decoded_token == tokenizer.decode([token_id], skip_special_tokens=False)
    assert worst < TOLERANCE
    return worst


def _prompts(lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (n,), generator=gen).tolist() for n in lengths]


def test_chunked_prefill_matches_transformers(tiny_llama_dir, reference):
    # A 16-token step budget spreads each prompt but the first over several steps.
    llm = LLM(model=tiny_llama_dir, dtype="float32", max_model_len=256, num_kv_blocks=64,
              max_num_batched_tokens=16)
    prompts = _prompts((1, 5, 40, 71), seed=7)
    ks = [3, 0, 5, 2]
    params = [SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=k, n=1 + (k == 2))
              for k in ks]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    worst = 0.0
    for prompt, k, output in zip(prompts, ks, outputs):
        assert output.prompt_logprobs is not None
        if len(prompt) == 1:
            assert output.prompt_logprobs == [None]
            continue
        worst = max(worst, check_against(hf_logprobs(reference, prompt), prompt, output.prompt_logprobs, k,
                                         llm.get_tokenizer()))
    print(f"max |ember - transformers| prompt logprob: {worst:.2e}")
    plain = llm.generate({"prompt_token_ids": prompts[2]}, SamplingParams(max_tokens=1), use_tqdm=False)[0]
    assert plain.prompt_logprobs is None


def test_prefix_cache_warm_engine_returns_every_prompt_logprob(tiny_llama_dir, reference):
    llm = LLM(model=tiny_llama_dir, dtype="float32", max_model_len=256, num_kv_blocks=64, enable_prefix_caching=True)
    [prompt] = _prompts((50,), seed=8)
    inputs = {"prompt_token_ids": prompt}
    llm.generate(inputs, SamplingParams(max_tokens=1), use_tqdm=False)  # warms 3 blocks of 16
    scored = llm.generate(inputs, SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)[0]
    assert scored.num_cached_tokens == 0  # no hit taken: every prompt row is recomputed
    check_against(hf_logprobs(reference, prompt), prompt, scored.prompt_logprobs, 1)
    again = llm.generate(inputs, SamplingParams(max_tokens=1), use_tqdm=False)[0]
    assert again.num_cached_tokens == 48  # the cache is still read by requests without prompt logprobs
    llm.engine.scheduler.check_invariants()


def test_preemption_recompute_does_not_duplicate_entries(tiny_llama_dir, reference):
    # 14 blocks of 16 tokens for 12 requests of 64 tokens: requests are preempted and recompute.
    llm = LLM(model=tiny_llama_dir, dtype="float32", num_kv_blocks=14, max_num_seqs=12,
              max_num_batched_tokens=64, max_model_len=256)
    prompts = _prompts([int(n) for n in torch.randint(20, 48, (12,), generator=torch.Generator().manual_seed(9))],
                       seed=10)
    params = [SamplingParams(temperature=0, max_tokens=64 - len(p), ignore_eos=True, prompt_logprobs=1)
              for p in prompts]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions_total > 0
    assert any(o.metrics.num_preemptions for o in outputs)
    for prompt, output in zip(prompts, outputs):
        check_against(hf_logprobs(reference, prompt), prompt, output.prompt_logprobs, 1)


def test_kv_cache_manager_serves_no_hit_to_prompt_logprobs_requests():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    tokens = list(range(10, 23))
    first = Request("a", tokens, SamplingParams())
    assert manager.allocate_slots(first, len(tokens))
    manager.free(first)
    assert manager.get_computed_blocks(Request("b", tokens, SamplingParams()))[1] == 12
    assert manager.get_computed_blocks(Request("c", tokens, SamplingParams(prompt_logprobs=0))) == ([], 0)
    manager.check_invariants()
