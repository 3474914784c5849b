"""KV eviction in the engine: positions are kept (checked against Hugging Face with the evicted keys
masked out), blocks stay within the budget, and eviction survives preemption and aborts."""

import pytest
import torch

from ember import LLM, SamplingParams

BUDGET, SINKS, BLOCK = 48, 4, 16


def _streaming_masks(prompt_len: int, num_output: int, chunk: int) -> torch.Tensor:
    """[S, S] bool: which positions each position's query sees under streaming eviction, replayed by
    hand: chunks of `chunk` prompt tokens, then one token a step; after each step a cache over BUDGET
    rows keeps the SINKS first and the latest BUDGET - BLOCK - SINKS."""
    total = prompt_len + num_output
    visible = torch.zeros(total, total, dtype=torch.bool)
    rows: list[int] = []
    steps = [range(s, min(s + chunk, prompt_len)) for s in range(0, prompt_len, chunk)]
    steps += [range(p, p + 1) for p in range(prompt_len, total - 1)]  # the last output is never fed back
    for step in steps:
        for p in step:  # causal within the step, over the rows kept before it
            visible[p, rows + list(range(step.start, p + 1))] = True
        rows += list(step)
        if len(rows) > BUDGET:
            keep = BUDGET - BLOCK
            rows = rows[:SINKS] + rows[len(rows) - (keep - SINKS):]
    return visible


def test_streaming_keeps_positions_and_matches_transformers_with_evicted_keys_masked(tiny_llama_dir):
    """Keys keep the rotation of their original position and a query is rotated at its own, so the
    engine must equal a full Hugging Face forward whose mask hides exactly the evicted keys."""
    from transformers import AutoModelForCausalLM

    prompt = torch.randint(3, 512, (70,), generator=torch.Generator().manual_seed(21)).tolist()
    llm = LLM(model=tiny_llama_dir, dtype="float32", max_model_len=256, num_kv_blocks=64, kv_eviction="streaming",
              kv_budget_tokens=BUDGET, kv_sink_tokens=SINKS)
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                                                     logprobs=0), use_tqdm=False)[0].outputs[0]
    assert llm.engine.eviction.num_evicted_total > 0
    ids = prompt + list(out.token_ids)
    visible = _streaming_masks(len(prompt), len(out.token_ids), chunk=BUDGET)
    mask = torch.zeros(1, 1, len(ids), len(ids)).masked_fill(~visible, torch.finfo(torch.float32).min)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, torch_dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        logits = hf(torch.tensor([ids]), attention_mask=mask, position_ids=torch.arange(len(ids))[None]).logits[0]
    expected = logits[len(prompt) - 1:-1].log_softmax(-1)  # row i predicts output token i
    got = torch.tensor([next(iter(entry.values())).logprob for entry in out.logprobs])
    torch.testing.assert_close(got, expected[torch.arange(len(got)), torch.tensor(out.token_ids)], atol=1e-4, rtol=1e-4)
    assert out.token_ids == expected.argmax(-1).tolist()
    # Without eviction the same forward with a plain causal mask differs: the masking mattered.
    with torch.no_grad():
        full = hf(torch.tensor([ids])).logits[0][len(prompt) - 1:-1].log_softmax(-1)
    assert (full - expected).abs().max() > 1e-3


@pytest.mark.parametrize("policy", ["streaming", "h2o", "snapkv"])
def test_blocks_stay_within_the_budget_while_long_requests_keep_generating(tiny_llama_dir, policy):
    budget = 80 if policy == "snapkv" else BUDGET
    llm = LLM(model=tiny_llama_dir, dtype="float32", max_model_len=256, num_kv_blocks=40, kv_eviction=policy,
              kv_budget_tokens=budget)
    engine = llm.engine
    gen = torch.Generator().manual_seed(22)
    for i, n in enumerate((150, 30, 90)):
        engine.add_request(str(i), torch.randint(3, 512, (n,), generator=gen).tolist(),
                           SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    # A request's table covers its rows before a step plus that step's tokens (at most the budget).
    most_blocks = -(-2 * budget // BLOCK)
    lengths = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            lengths[output.request_id] = len(output.outputs[0].token_ids)
        for request in engine.scheduler.running:
            assert request.num_kv_tokens <= budget
            assert len(engine.kv_cache_manager.get_block_ids(request.request_id)) <= most_blocks
        engine.scheduler.check_invariants()
    assert lengths == {"0": 100, "1": 100, "2": 100}
    assert engine.kv_cache_manager.usage == 0.0 and engine.eviction.num_evicted_total > 0
    assert not engine.kv_cache_manager.enable_prefix_caching  # compaction rewrites blocks in place


def test_smaller_chunks_tighten_the_bound(tiny_llama_dir):
    """With `long_prefill_token_threshold` under the budget, a request holds its kept rows plus at most
    that many new ones; without eviction the threshold alone caps each request's step."""
    for eviction in ({"kv_eviction": "streaming", "kv_budget_tokens": BUDGET}, {}):
        llm = LLM(model=tiny_llama_dir, dtype="float32", max_model_len=256, num_kv_blocks=40,
                  long_prefill_token_threshold=16, **eviction)
        engine = llm.engine
        seen = []  # (new tokens, blocks) of every scheduled entry
        schedule = engine.scheduler.schedule

        def recording():
            output = schedule()
            seen.extend((entry.num_new_tokens, len(entry.block_ids)) for entry in output.scheduled)
            return output

        engine.scheduler.schedule = recording
        out = llm.generate({"prompt_token_ids": list(range(10, 150))},
                           SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)[0]
        assert len(out.outputs[0].token_ids) == 40
        assert max(tokens for tokens, _ in seen) == 16
        most_blocks = max(blocks for _, blocks in seen)
        assert most_blocks == (-(-(BUDGET + 16) // BLOCK) if eviction else -(-179 // BLOCK))


def test_eviction_through_preemption_and_abort(tiny_llama_dir):
    llm = LLM(model=tiny_llama_dir, dtype="float32", max_model_len=256, num_kv_blocks=7, kv_eviction="h2o",
              kv_budget_tokens=BUDGET)
    engine = llm.engine
    gen = torch.Generator().manual_seed(23)
    for i in range(4):
        engine.add_request(str(i), torch.randint(3, 512, (60,), generator=gen).tolist(),
                           SamplingParams(temperature=0, max_tokens=80, ignore_eos=True))
    for _ in range(30):
        engine.step()
        engine.scheduler.check_invariants()
    assert engine.scheduler.num_preemptions_total > 0
    engine.abort_request(["0", "1"])
    done = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            done[output.request_id] = len(output.outputs[0].token_ids)
    assert done == {"2": 80, "3": 80}
    assert engine.eviction._states == {} and engine.kv_cache_manager.usage == 0.0


def test_budget_must_leave_room_for_the_policy(tiny_llama_dir):
    with pytest.raises(ValueError, match="kv_budget_tokens"):
        LLM(model=tiny_llama_dir, dtype="float32", max_model_len=256, kv_eviction="streaming")
    with pytest.raises(ValueError, match="at least"):
        LLM(model=tiny_llama_dir, dtype="float32", max_model_len=256, kv_eviction="snapkv", kv_budget_tokens=48)
    with pytest.raises(ValueError, match="kv_eviction"):
        LLM(model=tiny_llama_dir, dtype="float32", max_model_len=256, kv_eviction="lru", kv_budget_tokens=64)
