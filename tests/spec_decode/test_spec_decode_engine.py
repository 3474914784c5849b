"""Speculative decoding inside the batched engine, against the plain engine and `transformers`."""

import random

import pytest
import torch
from scipy.stats import chisquare

from ember import LLM, SamplingParams

BASE = dict(dtype="float32", max_model_len=256, num_kv_blocks=96)
# Every proposal verified whole ("max"), whatever the step costs: these tests exercise verification.
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "min_acceptance_rate": 0.0, "draft_budget": "max"}
SUFFIX = {"method": "suffix", "min_acceptance_rate": 0.0, "draft_budget": "max"}  # up to 24 drafts a step


def spec_config(method, checkpoint):
    if method == "suffix":
        pytest.importorskip("arctic_inference.suffix_decoding")
        return SUFFIX
    return NGRAM if method == "ngram" else draft_config(checkpoint.path)


def draft_config(path, k=3):
    return {"method": "draft_model", "model": path, "num_speculative_tokens": k, "min_acceptance_rate": 0.0,
            "draft_budget": "max"}


def repetitive_prompts(n, seed=0):
    """Prompts holding a repeated chunk, so prompt lookup finds matches."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        chunk = [rng.randint(3, 511) for _ in range(rng.randint(4, 10))]
        prompts.append([rng.randint(3, 511) for _ in range(rng.randint(2, 8))] + chunk * 3 + chunk[:2])
    return prompts


def generate(llm, prompts, params):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [[c.token_ids for c in o.outputs] for o in outs]


@pytest.fixture(scope="module")
def plain_greedy(tiny_llama_dir):
    llm = LLM(model=tiny_llama_dir, **BASE)
    prompts = repetitive_prompts(16)
    return prompts, generate(llm, prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))


def assert_clean(llm):
    llm.engine.scheduler.check_invariants()
    assert llm.engine.kv_cache_manager.usage == 0.0
    suffix = getattr(llm.engine.speculator, "suffix", None)
    assert suffix is None or not suffix.cache.active_requests  # every request's tree stopped


@pytest.mark.parametrize("method", ["ngram", "draft_model", "suffix"])
def test_greedy_batch_of_16_is_token_exact(method, tiny_llama_dir, dual_precision_checkpoint, plain_greedy):
    # The draft model is the tiny model's own RTN int4 checkpoint: it agrees often, not always.
    spec = spec_config(method, dual_precision_checkpoint)
    llm = LLM(model=tiny_llama_dir, **BASE, speculative_config=spec)
    prompts, expected = plain_greedy
    assert generate(llm, prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)) == expected
    stats = llm.engine.get_stats().spec_decoding
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens  # both acceptance and rejection ran
    assert_clean(llm)


@pytest.mark.parametrize("method", ["ngram", "draft_model", "suffix"])
def test_five_times_oversubscribed_cache_stays_exact_through_preemption(method, tiny_llama_dir, hf_greedy,
                                                                         dual_precision_checkpoint):
    # 16 blocks of 16 tokens = 256 tokens of KV; 20 requests of 64 tokens each need 1280.
    spec = spec_config(method, dual_precision_checkpoint)
    llm = LLM(model=tiny_llama_dir, dtype="float32", num_kv_blocks=16, max_num_seqs=16,
              max_num_batched_tokens=64, max_model_len=256, speculative_config=spec)
    prompts = [p[:40] for p in repetitive_prompts(20, seed=3)]
    params = [SamplingParams(temperature=0, max_tokens=64 - len(p), ignore_eos=True) for p in prompts]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions_total > 0
    assert llm.engine.get_stats().spec_decoding.num_accepted_tokens > 0
    for prompt, param, output in zip(prompts, params, outputs):
        assert output.outputs[0].token_ids == hf_greedy(prompt, param.max_tokens)
    assert_clean(llm)


def test_logprobs_stop_strings_n_and_prefix_cache_match_the_plain_engine(tiny_llama_dir):
    plain = LLM(model=tiny_llama_dir, **BASE)
    spec = LLM(model=tiny_llama_dir, **BASE, speculative_config=NGRAM)
    prompts = repetitive_prompts(6, seed=5)
    params = SamplingParams(temperature=0, max_tokens=30, logprobs=2, ignore_eos=True)
    for a, b in zip(*(llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
                      for llm in (plain, spec))):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert x.keys() == y.keys()
            assert all(abs(x[t].logprob - y[t].logprob) < 1e-4 and x[t].rank == y[t].rank for t in x)
    # A stop string and max_tokens end a request in the middle of an accepted run of drafts.
    texts = [o.outputs[0].text for o in plain.generate([{"prompt_token_ids": p} for p in prompts],
                                                        SamplingParams(temperature=0, max_tokens=30,
                                                                       ignore_eos=True), use_tqdm=False)]
    for prompt, text in zip(prompts, texts):
        stop = text[len(text) // 2:len(text) // 2 + 3]
        outs = [llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=30, n=2,
                                                                          stop=[stop], ignore_eos=True),
                             use_tqdm=False)[0] for llm in (plain, spec)]
        assert [[c.text, c.finish_reason, c.token_ids] for c in outs[0].outputs] == \
               [[c.text, c.finish_reason, c.token_ids] for c in outs[1].outputs]
        for max_tokens in (1, 2, 7):  # max_tokens caps the drafts: never a token too many
            one = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
            a, b = (llm.generate({"prompt_token_ids": prompt}, one, use_tqdm=False)[0].outputs[0]
                    for llm in (plain, spec))
            assert a.token_ids == b.token_ids and len(b.token_ids) == max_tokens
    # Blocks the speculating engine cached hold verified tokens only: a longer prompt that reuses them
    # continues exactly as an engine without a prefix cache.
    first = spec.generate({"prompt_token_ids": prompts[0]}, params, use_tqdm=False)[0].outputs[0].token_ids
    longer = prompts[0] + first
    hits_before = spec.engine.kv_cache_manager.num_hit_tokens
    again = spec.generate({"prompt_token_ids": longer}, SamplingParams(temperature=0, max_tokens=20,
                                                                       ignore_eos=True), use_tqdm=False)
    assert spec.engine.kv_cache_manager.num_hit_tokens - hits_before >= 16 * ((len(longer) - 1) // 16)
    no_cache = LLM(model=tiny_llama_dir, **BASE, enable_prefix_caching=False)
    assert again[0].outputs[0].token_ids == no_cache.generate(
        {"prompt_token_ids": longer}, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
        use_tqdm=False)[0].outputs[0].token_ids
    assert_clean(spec)


@pytest.fixture(scope="module")
def peaked_model_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny model with its head scaled up, so temperature 1.0 gives peaked distributions (drafts are
    accepted often enough for both branches of rejection sampling to run)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    path = tmp_path_factory.mktemp("tiny-llama-peaked")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(path)
    return str(path), model.eval()


def test_sampled_second_token_follows_the_targets_distribution(peaked_model_dir):
    """At temperature 1.0 the second generated token (the first one verified against a draft) has the
    target's marginal distribution sum_t1 p(t1) p(t2 | t1), computed exactly with `transformers`."""
    path, hf = peaked_model_dir
    prompt = [5, 17, 99, 230, 41, 7]
    with torch.inference_mode():
        p1 = hf(torch.tensor([prompt])).logits[0, -1].double().softmax(-1)  # [V]
        vocab = p1.shape[0]
        batch = torch.cat([torch.tensor([prompt]).repeat(vocab, 1), torch.arange(vocab)[:, None]], dim=1)
        p2 = hf(batch).logits[:, -1].double().softmax(-1)  # [V, V]: row t1 is p(t2 | t1)
    marginal = p1 @ p2  # [V]
    llm = LLM(model=path, **BASE, speculative_config=draft_config(path, k=2))  # the target drafts for itself
    num = 4000
    params = SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": prompt}] * num, params, use_tqdm=False)
    second = torch.tensor([o.outputs[0].token_ids[1] for o in outs])
    stats = llm.engine.get_stats().spec_decoding
    assert stats.num_drafts >= num and 0.2 < stats.acceptance_rate < 0.95
    observed = torch.bincount(second, minlength=vocab).double()
    expected = marginal * num
    big = expected >= 5  # categories with enough expected counts, the rest pooled
    obs = torch.cat([observed[big], observed[~big].sum(0, keepdim=True)]).numpy()
    exp = torch.cat([expected[big], expected[~big].sum(0, keepdim=True)]).numpy()
    assert big.sum() >= 5
    assert chisquare(obs, exp * obs.sum() / exp.sum()).pvalue > 0.01
    assert_clean(llm)


def test_a_failing_proposer_costs_drafts_not_requests(tiny_llama_dir, plain_greedy):
    llm = LLM(model=tiny_llama_dir, **BASE, speculative_config=NGRAM)
    real, calls = llm.engine.speculator.ngram.propose, [0]

    def flaky(tokens, k):
        calls[0] += 1
        if 17 <= calls[0] <= 30:  # the first step proposes for all 16; the next 14 steps fail at once
            raise RuntimeError("injected proposer fault")
        return real(tokens, k)

    llm.engine.speculator.ngram.propose = flaky
    prompts, expected = plain_greedy
    assert generate(llm, prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)) == expected
    assert calls[0] > 30 and llm.engine.get_stats().spec_decoding.num_accepted_tokens > 0
    assert_clean(llm)
