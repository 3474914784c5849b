"""End-to-end engine behaviour on the tiny random model: preemption, errors, sampling options."""

import pytest
import torch

from ember import LLM, SamplingParams


def test_stress_five_times_the_cache_completes_through_preemption(tiny_llama_dir, hf_greedy):
    # 16 blocks of 16 tokens = 256 tokens of KV; 20 requests of 64 tokens each need 1280.
    llm = LLM(model=tiny_llama_dir, dtype="float32", num_kv_blocks=16, max_num_seqs=16,
              max_num_batched_tokens=64, max_model_len=256)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 512, (int(n),), generator=gen).tolist()
               for n in torch.randint(20, 48, (20,), generator=gen)]
    params = [SamplingParams(temperature=0, max_tokens=64 - len(p), ignore_eos=True) for p in prompts]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions_total > 0
    for prompt, param, output in zip(prompts, params, outputs):
        assert output.outputs[0].token_ids == hf_greedy(prompt, param.max_tokens)
        assert output.outputs[0].finish_reason == "length"
    llm.engine.scheduler.check_invariants()
    assert llm.engine.kv_cache_manager.usage == 0.0


def test_requests_that_can_never_fit_fail_at_submission(tiny_llama_dir):
    llm = LLM(model=tiny_llama_dir, dtype="float32", num_kv_blocks=4, max_model_len=128)
    with pytest.raises(ValueError, match="maximum context length"):
        llm.generate({"prompt_token_ids": [5] * 100}, SamplingParams(max_tokens=50))
    with pytest.raises(ValueError, match="maximum model length"):
        llm.generate({"prompt_token_ids": [5] * 128}, SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="KV-cache blocks"):
        llm.generate({"prompt_token_ids": [5] * 60}, SamplingParams(max_tokens=20))
    with pytest.raises(ValueError, match="empty"):
        llm.generate({"prompt_token_ids": []})
    with pytest.raises(ValueError, match="token ids"):
        llm.generate({"prompt_token_ids": [1, 10**6]})
    # The engine keeps serving afterwards.
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=4, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    assert not llm.engine.has_unfinished_requests()


def test_n_samples_seeded_and_reproducible(tiny_llama_dir):
    llm = LLM(model=tiny_llama_dir, dtype="float32", num_kv_blocks=64, max_model_len=256)
    prompt = {"prompt_token_ids": list(range(10, 40))}
    params = SamplingParams(n=3, temperature=1.0, seed=1234, max_tokens=12, ignore_eos=True)
    first = llm.generate(prompt, params, use_tqdm=False)[0]
    # The same seeded request next to other traffic samples the same tokens.
    noise = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    again = llm.generate([{"prompt_token_ids": [7] * 20}, prompt], [noise, params], use_tqdm=False)[1]
    assert [o.index for o in first.outputs] == [0, 1, 2]
    assert [o.token_ids for o in first.outputs] == [o.token_ids for o in again.outputs]
    assert len({tuple(o.token_ids) for o in first.outputs}) > 1  # the samples differ


def test_logprobs_match_reference_log_softmax(tiny_llama_dir, tiny_llama_hf):
    llm = LLM(model=tiny_llama_dir, dtype="float32", num_kv_blocks=64, max_model_len=256)
    prompt = list(range(20, 50))
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(temperature=0, max_tokens=5, logprobs=3, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    with torch.inference_mode():
        logits = tiny_llama_hf(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1:-1]
    expected = torch.log_softmax(logits, -1)
    for step, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        assert entry[token].rank == 1
        assert abs(entry[token].logprob - expected[step, token].item()) < 1e-4
        top = expected[step].topk(3).indices.tolist()
        assert set(top) <= set(entry)
    assert out.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs)))


def test_stop_strings_and_stop_token_ids(tiny_llama_dir):
    llm = LLM(model=tiny_llama_dir, dtype="float32", num_kv_blocks=64, max_model_len=256)
    prompt = {"prompt_token_ids": list(range(60, 90))}
    base = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    # Stop on the 6th generated token id.
    stop_id = base.token_ids[5]
    first = base.token_ids.index(stop_id)
    cut = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_id]),
                       use_tqdm=False)[0].outputs[0]
    assert cut.token_ids == base.token_ids[:first + 1]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop_id
    # Stop on a piece of the generated text: the output ends right before it.
    text = base.text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    if stop.strip():
        out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, stop=[stop]),
                           use_tqdm=False)[0].outputs[0]
        assert out.finish_reason == "stop" and out.stop_reason == stop
        assert out.text == text[:text.index(stop)]


def test_min_tokens_blocks_eos(tiny_llama_dir):
    llm = LLM(model=tiny_llama_dir, dtype="float32", num_kv_blocks=64, max_model_len=256)
    eos = llm.engine.eos_token_id
    params = SamplingParams(temperature=0, max_tokens=8, min_tokens=8, logit_bias={eos: 100.0})
    out = llm.generate({"prompt_token_ids": [9, 10, 11]}, params, use_tqdm=False)[0].outputs[0]
    assert eos not in out.token_ids and len(out.token_ids) == 8
    params = SamplingParams(temperature=0, max_tokens=8, min_tokens=2, logit_bias={eos: 100.0})
    out = llm.generate({"prompt_token_ids": [9, 10, 11]}, params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids[-1] == eos and len(out.token_ids) == 3 and out.finish_reason == "stop"
