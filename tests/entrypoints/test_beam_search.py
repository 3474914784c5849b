"""`LLM.beam_search` against Hugging Face beam search on the tiny random Llama, its KV sharing, and vLLM's
EOS and length-penalty rules on a scripted model."""

from types import SimpleNamespace

import pytest
import torch

from ember import LLM, BeamSearchParams
from ember.entrypoints.beam_search import beam_search, get_beam_search_score
from ember.kv_cache.kv_cache_manager import KVCacheManager
from ember.outputs import CompletionOutput, Logprob, RequestOutput

MAX_TOKENS = 10
PROMPT_LENGTHS = (5, 15, 16, 30, 47)  # below, at and across the 16-token block boundaries


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(model=tiny_llama_dir, dtype="float32", num_kv_blocks=128, max_model_len=256)


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(3, 512, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def _hf_beam_search(model, prompt: list[int], length_penalty: float):
    # No EOS: no beam ends early, which is where Hugging Face's and vLLM's rules coincide.
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), num_beams=4, num_return_sequences=4, do_sample=False,
                             max_new_tokens=MAX_TOKENS, length_penalty=length_penalty, early_stopping=True,
                             eos_token_id=None, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    return out.sequences.tolist(), out.sequences_scores.tolist()


def _assert_free(llm):
    engine = llm.engine
    engine.scheduler.check_invariants()
    assert not engine.has_unfinished_requests()
    assert engine.kv_cache_manager.num_used_blocks == 0
    assert engine.kv_cache_manager.num_free_blocks == engine.kv_cache_manager.num_blocks


@pytest.mark.parametrize("length_penalty", [1.0, 0.5])
def test_sequences_and_scores_equal_transformers(llm, tiny_llama_hf, length_penalty):
    prompts = _prompts()
    params = BeamSearchParams(beam_width=4, max_tokens=MAX_TOKENS, ignore_eos=True, length_penalty=length_penalty)
    outputs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
    for prompt, output in zip(prompts, outputs):
        hf_sequences, hf_scores = _hf_beam_search(tiny_llama_hf, prompt, length_penalty)
        assert [s.tokens for s in output.sequences] == hf_sequences
        # Hugging Face divides by the generated length, vLLM by the whole one: with equal lengths the
        # ranking is the same, and the scores are the cumulative logprobs over that length.
        scores = [s.cum_logprob / MAX_TOKENS ** length_penalty for s in output.sequences]
        assert scores == pytest.approx(hf_scores, abs=1e-4)
        for seq in output.sequences:
            assert seq.finish_reason == "length"
            generated = seq.tokens[len(prompt):]
            assert seq.cum_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(generated, seq.logprobs)))
            assert seq.text == llm.get_tokenizer().decode(seq.tokens)
    _assert_free(llm)


def test_beams_share_kv_blocks(llm):
    prompt = {"prompt_token_ids": _prompts()[-1]}  # 47 tokens: 2 full blocks, then a partial one
    one = llm.beam_search(prompt, BeamSearchParams(beam_width=1, max_tokens=MAX_TOKENS, ignore_eos=True))[0]
    four = llm.beam_search(prompt, BeamSearchParams(beam_width=4, max_tokens=MAX_TOKENS, ignore_eos=True))[0]
    single, beams = one.kv_stats, four.kv_stats
    assert len(beams.num_blocks_in_use) == MAX_TOKENS
    assert single.num_blocks_in_use == single.num_blocks_unshared  # one sequence shares nothing
    # From step 2 on, four beams list four tables as long as the single sequence's; the prompt's full
    # blocks are held once.
    assert beams.num_blocks_unshared[1:] == [4 * n for n in single.num_blocks_unshared[1:]]
    assert all(used < unshared for used, unshared in zip(beams.num_blocks_in_use[1:], beams.num_blocks_unshared[1:]))
    assert beams.peak_blocks_in_use < 4 * single.peak_blocks_in_use
    assert four.sequences[0].cum_logprob >= one.sequences[0].cum_logprob - 1e-6  # a wider search finds as good
    _assert_free(llm)


def test_bad_params_raise():
    with pytest.raises(ValueError, match="beam_width must be an integer >= 1, got 0"):
        BeamSearchParams(beam_width=0, max_tokens=4)
    with pytest.raises(ValueError, match="max_tokens must be an integer >= 1, got 0"):
        BeamSearchParams(beam_width=2, max_tokens=0)
    with pytest.raises(ValueError, match="length_penalty must be a finite number"):
        BeamSearchParams(beam_width=2, max_tokens=4, length_penalty=float("nan"))


def test_prompt_too_long_fails_before_running(llm):
    params = BeamSearchParams(beam_width=2, max_tokens=20)
    with pytest.raises(ValueError, match="maximum context length"):
        llm.beam_search([{"prompt_token_ids": [5] * 10}, {"prompt_token_ids": [5] * 240}], params)
    _assert_free(llm)
    text = "Beautiful is better than ugly."  # tokenized as `generate` does
    sequences = llm.beam_search(text, params)[0].sequences
    prompt_ids = llm.get_tokenizer().encode(text)
    assert len(sequences) == 2 and all(s.tokens[:len(prompt_ids)] == prompt_ids for s in sequences)


def test_a_failed_step_raises_and_frees_every_block(tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("EMBER_TEST_FAULT_TOKEN", "377")  # a prompt holding it fails inside the engine step
    faulty = LLM(model=tiny_llama_dir, dtype="float32", num_kv_blocks=32, max_model_len=256)
    prompts = [{"prompt_token_ids": [5] * 20}, {"prompt_token_ids": [5] * 20 + [377]}]
    with pytest.raises(RuntimeError, match="beam search step failed"):
        faulty.beam_search(prompts, BeamSearchParams(beam_width=2, max_tokens=4))
    _assert_free(faulty)


# ---- vLLM's rules, on a scripted model (no engine): EOS = 2, prompt [9] ------------------------------
SCRIPT = {  # sequence -> {candidate token: logprob}
    (9,): {5: -0.1, 6: -0.2, 2: -0.5, 7: -3.0},  # EOS ranks third: it still completes (vLLM, not HF)
    (9, 5): {8: -0.5, 4: -0.6, 2: -4.0},
    (9, 6): {3: -1.0, 4: -2.0},
}


class _ScriptedLLM:
    """Just what `beam_search` uses of an `LLM`: `generate` answers from SCRIPT, and an idle engine."""

    def __init__(self) -> None:
        tokenizer = SimpleNamespace(decode=lambda ids: " ".join(map(str, ids)))
        self.engine = SimpleNamespace(tokenizer=tokenizer, eos_token_id=2, config=SimpleNamespace(max_model_len=16),
                                      kv_cache_manager=KVCacheManager(8, 4))

    def generate(self, prompts, params, use_tqdm):
        assert params.max_tokens == 1 and params.logprobs == 4
        entries = [{t: Logprob(v) for t, v in SCRIPT[tuple(p["prompt_token_ids"])].items()} for p in prompts]
        return [RequestOutput(str(i), None, p["prompt_token_ids"], [CompletionOutput(0, "", [], logprobs=[e])], True)
                for i, (p, e) in enumerate(zip(prompts, entries))]


def _scripted_search(length_penalty: float, include_eos: bool):
    params = BeamSearchParams(beam_width=2, max_tokens=2, length_penalty=length_penalty,
                              include_stop_str_in_output=include_eos)
    return beam_search(_ScriptedLLM(), [([9], None)], params)[0].sequences


@pytest.mark.parametrize("include_eos", [False, True])
def test_eos_completes_at_once_and_ranks_by_whole_length(include_eos):
    eos_tail = [2] if include_eos else []
    # length_penalty 1: [9 5 8] scores -0.6 / 3 = -0.2, above [9 (EOS)] at -0.5 / 1.
    best = _scripted_search(1.0, include_eos)
    assert [s.tokens for s in best] == [[9, 5, 8], [9, 5, 4]]
    assert [s.finish_reason for s in best] == ["length", "length"]
    # length_penalty 0 ranks by the sum alone: the early EOS beam wins, then [9 5 8].
    best = _scripted_search(0.0, include_eos)
    assert [s.tokens for s in best] == [[9] + eos_tail, [9, 5, 8]]
    assert (best[0].finish_reason, best[0].stop_reason, best[0].cum_logprob) == ("stop", 2, -0.5)
    assert best[0].text == " ".join(map(str, [9] + eos_tail))
    assert get_beam_search_score([9, 2], -0.5, 2, 3.0) == get_beam_search_score([9], -0.5, 2, 3.0) == -0.5
