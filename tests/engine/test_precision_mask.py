"""The runtime precision mask in the engine (float32, tiny int4 Llama with float copies of every linear):
a request switched to bf16 mid-generation, requests admitted in bf16, set_precision, the prefix cache."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ember import LLM, SamplingParams

MAX_TOKENS = 24
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


def batch_prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    lengths = torch.randint(8, 30, (8,), generator=gen)
    return [torch.randint(3, 512, (int(n),), generator=gen).tolist() for n in lengths]


class DenseFromPosition(nn.Module):
    """A quantized HF linear whose rows at positions >= `start` use the float weight instead."""

    def __init__(self, quantized: nn.Module, weight: torch.Tensor, start: int) -> None:
        super().__init__()
        self.quantized, self.weight, self.start = quantized, weight, start

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [1, seq, in]: the whole sequence each call
        out = self.quantized(x).clone()
        out[:, self.start:] = F.linear(x[:, self.start:], self.weight)
        return out


def reference_greedy(ckpt, prompt: list[int], dense_from: int, ops=None, num_tokens: int = MAX_TOKENS) -> list[int]:
    """Greedy tokens of the Hugging Face model holding the same QuantLinears, in which the flagged ops
    (`ops`, default all) compute every position >= `dense_from` from the float weights.

    No KV cache: every step recomputes the whole sequence, so each position's path is decided by its
    position alone; with causal attention the positions before `dense_from` (their KV included) are
    exactly the quantized ones and everything from `dense_from` on is dense. That is what "the flagged
    ops were bf16 from token k on" means for a switch at output token k: `dense_from = len(prompt) + k - 1`,
    the position whose logits give token k.

    Re-submitting prompt + the first k tokens as a new bf16 request would not be equivalent: it would
    recompute the KV of those k tokens and of the prompt on the dense path too.
    """
    model = copy.deepcopy(ckpt.hf_quantized)
    for name, weight in ckpt.float_weights.items():
        if ops is None or name in ops:
            model.set_submodule(name, DenseFromPosition(model.get_submodule(name), weight, dense_from))
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(num_tokens):
            ids.append(int(model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    return ids[len(prompt):]


def run_batch(engine, prompts, params=GREEDY, forced: str | None = None, switch_at: int | None = None):
    """Run every prompt to the end; switch request `forced` to bf16 once it has `switch_at` output tokens.
    Returns the outputs in order and the forced request's preemption count at the switch."""
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    finished, preemptions_at_switch = {}, None
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
        engine.scheduler.check_invariants()
        request = engine.scheduler.requests.get(forced)
        if request is not None and request.num_output_tokens == switch_at and preemptions_at_switch is None:
            assert engine.set_request_precision(forced, "bf16") == 1
            preemptions_at_switch = request.num_preemptions
    return [finished[str(i)] for i in range(len(prompts))], preemptions_at_switch


@pytest.fixture(scope="module")
def baseline(dual_precision_checkpoint):
    """The 8 greedy requests with nobody switched (all quantized), and the reference of that."""
    prompts = batch_prompts()
    outputs, _ = run_batch(dual_precision_checkpoint.make_engine(num_kv_blocks=64), prompts)
    tokens = [o.outputs[0].token_ids for o in outputs]
    assert tokens[6] == reference_greedy(dual_precision_checkpoint, prompts[6], dense_from=10**6)
    return prompts, tokens


@pytest.mark.parametrize("cache", [dict(num_kv_blocks=64), dict(num_kv_blocks=14, max_num_batched_tokens=48)],
                         ids=["ample-cache", "preempted-after-switch"])
def test_request_forced_to_bf16_mid_generation(dual_precision_checkpoint, baseline, cache):
    """Must-show 2 (engine half): in a batch of 8 greedy requests one is switched at output token k=4;
    the other 7 produce exactly their tokens without it, the switched one the tokens of a run whose
    flagged ops were dense from token k on (see `reference_greedy`), which differ from the quantized
    ones, so the test can fail. With the small cache the switched request is preempted after the
    switch and recomputes its prefix (quantized before the switch position, dense after, prefix-cache
    hits limited to the blocks before it)."""
    prompts, expected = baseline
    forced, k = 6, 4
    engine = dual_precision_checkpoint.make_engine(**cache)
    if "max_num_batched_tokens" in cache:  # admission may fill the cache (vLLM V1's rule): 6 is preempted
        engine.scheduler.reserve_blocks_per_seq = 0
    outputs, preemptions_at_switch = run_batch(engine, prompts, forced=str(forced), switch_at=k)
    for i, output in enumerate(outputs):
        if i != forced:
            assert output.outputs[0].token_ids == expected[i], f"request {i} changed"
            assert output.precision_switch_token is None
    switched = outputs[forced]
    reference = reference_greedy(dual_precision_checkpoint, prompts[forced], dense_from=len(prompts[forced]) + k - 1)
    assert switched.outputs[0].token_ids == reference
    assert reference[:k] == expected[forced][:k] and reference[k:] != expected[forced][k:]
    assert switched.precision_switch_token == k and switched.outputs[0].precision_switch_token == k
    assert engine.get_stats().num_precision_fallbacks_total == 1
    if "max_num_batched_tokens" in cache:
        assert switched.metrics.num_preemptions > preemptions_at_switch
    assert engine.kv_cache_manager.usage == 0.0


def test_request_admitted_in_bf16_ignores_quantized_prefix_cache(dual_precision_checkpoint, baseline):
    """A bf16 request runs dense from position 0 and never reuses the quantized KV of the same prompt
    (nor leaves its KV to quantized requests), while bf16 requests share theirs."""
    prompts, expected = baseline
    llm = LLM.from_engine(dual_precision_checkpoint.make_engine(num_kv_blocks=64))
    bf16 = GREEDY.clone(precision="bf16")
    prompt = prompts[0] * 2  # two full blocks and more
    quantized_first = llm.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)[0]
    dense = llm.generate({"prompt_token_ids": prompt}, bf16, use_tqdm=False)[0]
    dense_again = llm.generate({"prompt_token_ids": prompt}, bf16, use_tqdm=False)[0]
    quantized_again = llm.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)[0]
    num_full = (len(prompt) - 1) // 16 * 16  # the blocks a hit may serve (one token is always computed)
    assert num_full >= 32
    assert dense.num_cached_tokens == 0 and dense_again.num_cached_tokens == num_full
    assert quantized_again.num_cached_tokens == num_full
    assert dense.outputs[0].token_ids == reference_greedy(dual_precision_checkpoint, prompt, dense_from=0)
    assert dense_again.outputs[0].token_ids == dense.outputs[0].token_ids
    assert quantized_again.outputs[0].token_ids == quantized_first.outputs[0].token_ids
    assert dense.outputs[0].token_ids != quantized_first.outputs[0].token_ids
    assert dense.precision_switch_token is None  # admitted in bf16: no switch


def test_set_precision_changes_new_requests_only(dual_precision_checkpoint):
    """A request keeps the op set it was admitted with; the default precision applies to new requests."""
    ckpt = dual_precision_checkpoint
    llm = LLM.from_engine(ckpt.make_engine(num_kv_blocks=64))
    engine, prompts = llm.engine, batch_prompts()
    engine.add_request("all-ops", prompts[0], GREEDY.clone(precision="bf16"))
    engine.add_request("quantized", prompts[1], GREEDY)
    for _ in range(3):
        engine.step()
    state = llm.set_precision(ops=["model.layers.*.mlp.down_proj"], default_precision="bf16")
    assert state.enabled_ops == ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj")
    engine.add_request("down-only", prompts[2], GREEDY)  # no precision given: the new default, bf16
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update((o.request_id, o.outputs[0].token_ids) for o in engine.step() if o.finished)
    assert outputs["all-ops"] == reference_greedy(ckpt, prompts[0], dense_from=0)
    assert outputs["quantized"] == reference_greedy(ckpt, prompts[1], dense_from=10**6)
    down = {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    expected = reference_greedy(ckpt, prompts[2], dense_from=0, ops=down)
    assert outputs["down-only"] == expected != reference_greedy(ckpt, prompts[2], dense_from=0)
    assert llm.set_precision(ops="down_proj").enabled_ops == state.enabled_ops  # a dotted suffix
    assert len(llm.set_precision(ops="*").enabled_ops) == 14


def test_bad_precision_input_raises_and_the_engine_keeps_serving(dual_precision_checkpoint):
    llm = LLM.from_engine(dual_precision_checkpoint.make_engine(num_kv_blocks=64))
    before = llm.get_precision()
    with pytest.raises(ValueError, match="matches no layer"):
        llm.set_precision(ops=["model.layers.7.mlp.down_proj"], default_precision="bf16")
    with pytest.raises(ValueError, match="default_precision must be one of"):
        llm.set_precision(ops=["down_proj"], default_precision="fp8")
    with pytest.raises(ValueError, match="non-empty"):
        llm.set_precision(ops=[""])
    assert llm.get_precision() == before  # all or nothing
    with pytest.raises(ValueError, match="precision must be one of"):
        SamplingParams(precision="int4")
    with pytest.raises(ValueError, match="no unfinished request"):
        llm.engine.set_request_precision("nobody")
    with pytest.raises(ValueError, match="only switch to"):
        llm.engine.set_request_precision("nobody", "quantized")
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, GREEDY, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == MAX_TOKENS and not llm.engine.has_unfinished_requests()


def test_model_without_dual_layers_refuses_precision_changes(tiny_llama_dir):
    llm = LLM(model=tiny_llama_dir, dtype="float32", num_kv_blocks=16, max_model_len=128)
    assert llm.get_precision().available_ops == ()
    with pytest.raises(ValueError, match="no dual-precision layers"):
        llm.set_precision(default_precision="bf16")
    with pytest.raises(ValueError, match="high-precision copies"):
        llm.generate({"prompt_token_ids": [5, 6]}, SamplingParams(max_tokens=2, precision="bf16"), use_tqdm=False)
    out = llm.generate({"prompt_token_ids": [5, 6]}, SamplingParams(max_tokens=2, precision="quantized"),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2


@pytest.mark.parametrize("native", ["0", "1"], ids=["modules", "native-loop"])
def test_in_bfloat16_the_others_keep_their_exact_logprobs(dual_precision_checkpoint, monkeypatch, native):
    """bfloat16, where the quantized kernel (and so its rounding) depends on the row count it is given (up to 4
    rows and beyond): while one of 5 requests is dense the quantized kernels still run all 5 rows (the dense
    row overwrites its own), so the other 4 get exactly the tokens and logprobs of steps without it, in the
    layer modules and in the native decode loop."""
    monkeypatch.setenv("EMBER_DISABLE_NATIVE_DECODE", "0" if native == "1" else "1")
    prompts = batch_prompts()[:5]
    params = GREEDY.clone(logprobs=3)
    expected, _ = run_batch(dual_precision_checkpoint.make_engine("bfloat16", num_kv_blocks=64), prompts, params)
    outputs, _ = run_batch(dual_precision_checkpoint.make_engine("bfloat16", num_kv_blocks=64), prompts, params,
                           forced="3", switch_at=4)
    for i, output in enumerate(outputs):
        if i != 3:
            assert output.outputs[0].token_ids == expected[i].outputs[0].token_ids, f"request {i} changed"
            assert output.outputs[0].logprobs == expected[i].outputs[0].logprobs, f"request {i} changed"
    assert outputs[3].outputs[0].logprobs[4:] != expected[3].outputs[0].logprobs[4:]  # the switch mattered
