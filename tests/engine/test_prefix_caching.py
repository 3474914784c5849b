"""Automatic prefix caching changes speed, never outputs."""

import torch

from ember import LLM, SamplingParams


def _prompts():
    gen = torch.Generator().manual_seed(5)
    system = torch.randint(3, 512, (48,), generator=gen).tolist()  # 3 full blocks of 16
    prompts = [system + torch.randint(3, 512, (int(n),), generator=gen).tolist()
               for n in torch.randint(1, 30, (8,), generator=gen)]
    prompts.append(system[:40] + [7, 8, 9])  # shares a prefix that ends mid-block
    prompts.append(list(system))  # exactly the cached blocks: one token must still be computed
    prompts.append(list(prompts[0]))  # identical to another prompt
    return prompts


def test_greedy_outputs_identical_with_caching_on_and_off(tiny_llama_dir):
    prompts = [{"prompt_token_ids": p} for p in _prompts()]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    results = {}
    for caching in (False, True):
        llm = LLM(model=tiny_llama_dir, dtype="float32", num_kv_blocks=128, max_model_len=256,
                  max_num_batched_tokens=64, enable_prefix_caching=caching)
        first = llm.generate(prompts, params, use_tqdm=False)
        # A second round finds everything cached (when caching is on).
        second = llm.generate(prompts, params, use_tqdm=False)
        n2 = llm.generate(prompts[0], SamplingParams(n=2, temperature=0, max_tokens=12, ignore_eos=True),
                          use_tqdm=False)[0]
        results[caching] = ([o.outputs[0].token_ids for o in first + second],
                            [o.token_ids for o in n2.outputs], [o.num_cached_tokens for o in second])
        llm.engine.scheduler.check_invariants()
        assert llm.engine.kv_cache_manager.usage == 0.0
        stats = llm.get_stats()
        assert (stats.prefix_cache_hits > 0) == caching
    assert results[True][0] == results[False][0]
    assert results[True][1] == results[False][1]
    assert results[True][0][:11] == results[True][0][11:]
    # Second round with caching: every full block of each prompt was a hit.
    assert results[True][2] == [((len(p) - 1) // 16) * 16 for p in _prompts()]
    assert results[False][2] == [0] * len(prompts)


def test_cache_salt_isolates_tenants(tiny_llama_dir):
    llm = LLM(model=tiny_llama_dir, dtype="float32", num_kv_blocks=64, max_model_len=256)
    prompt = list(range(100, 150))
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    llm.generate({"prompt_token_ids": prompt, "cache_salt": "a"}, params, use_tqdm=False)
    other = llm.generate({"prompt_token_ids": prompt, "cache_salt": "b"}, params, use_tqdm=False)[0]
    same = llm.generate({"prompt_token_ids": prompt, "cache_salt": "a"}, params, use_tqdm=False)[0]
    assert other.num_cached_tokens == 0
    assert same.num_cached_tokens == 48
