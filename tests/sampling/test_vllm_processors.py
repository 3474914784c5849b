"""vLLM's allowed_token_ids, bad_words and truncate_prompt_tokens, against transformers on the tiny Llama.

References: transformers' `generate(prefix_allowed_tokens_fn=...)` for allowed ids; its logits, step by
step, with vLLM's bad-word rule written out here; and the engine on the last k prompt tokens alone.
"""

from __future__ import annotations

import pytest
import torch

from ember import LLM, SamplingParams
from ember.request import Request
from ember.sampling import Sampler, SamplingMetadata
from ember.sampling.bad_words import tokenize_bad_words

PROMPT = "Beautiful is better than ugly. Explicit is better than"
VOCAB = 512


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(model=tiny_llama_dir, dtype="float32", num_kv_blocks=64, max_model_len=256)


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def greedy(llm, prompt, max_tokens=12, **kwargs) -> list[int]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kwargs)
    return llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids


def hf_next_logits(model, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():  # not inference_mode: the caller edits the row
        return model(torch.tensor([token_ids])).logits[0, -1].float()  # [V]


def vllm_bad_word_bans(sequences: list[list[int]], output: list[int]) -> set[int]:
    """vLLM's rule, written out: a sequence bans its last token when the newest len - 1 output tokens
    equal the rest of it (the prompt never counts)."""
    banned = set()
    for seq in sequences:
        prefix = seq[:-1]
        if len(prefix) <= len(output) and output[len(output) - len(prefix):] == prefix:
            banned.add(seq[-1])
    return banned


def reference_greedy_with_bad_words(model, prompt_ids, sequences, max_tokens) -> list[int]:
    out: list[int] = []
    for _ in range(max_tokens):
        logits = hf_next_logits(model, prompt_ids + out)
        for token in vllm_bad_word_bans(sequences, out):
            logits[token] = float("-inf")
        out.append(int(logits.argmax()))
    return out


def vllm_variants(hf_tokenizer, word: str) -> list[list[int]]:
    """vLLM's `update_from_tokenizer` for one word, on the Hugging Face tokenizer itself."""
    plain = hf_tokenizer.encode(word.lstrip(), add_special_tokens=False)
    spaced = hf_tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
    keep_spaced = spaced and spaced[0] != plain[0] and len(spaced) == len(plain)
    return [plain, spaced] if keep_spaced else [plain]


# ---- allowed_token_ids ----------------------------------------------------------------------------

def test_allowed_token_ids_greedy_equals_transformers_constrained_argmax(llm, reference, hf_tokenizer):
    prompt_ids = hf_tokenizer.encode(PROMPT)
    unconstrained = greedy(llm, {"prompt_token_ids": prompt_ids})
    allowed = sorted({7, 99, 300, 451} - set(unconstrained[:1]))  # the first greedy token is not allowed
    got = greedy(llm, {"prompt_token_ids": prompt_ids}, allowed_token_ids=allowed)
    with torch.inference_mode():
        want = reference.generate(torch.tensor([prompt_ids]), max_new_tokens=12, do_sample=False,
                                  eos_token_id=None, pad_token_id=0,
                                  prefix_allowed_tokens_fn=lambda batch_id, ids: allowed)
    assert got == want[0, len(prompt_ids):].tolist()
    assert set(got) <= set(allowed)


def test_allowed_token_ids_random_sampling_stays_inside(llm):
    allowed = [5, 17, 123, 400]
    params = SamplingParams(n=3, temperature=1.5, top_p=0.95, seed=7, max_tokens=16, ignore_eos=True,
                            allowed_token_ids=allowed)
    other = SamplingParams(temperature=1.0, seed=8, max_tokens=16, ignore_eos=True)
    outs = llm.generate([PROMPT, PROMPT], [params, other], use_tqdm=False)
    for sample in outs[0].outputs:
        assert set(sample.token_ids) <= set(allowed)
    assert len({t for s in outs[0].outputs for t in s.token_ids}) > 1  # it does sample
    assert not set(outs[1].outputs[0].token_ids) <= set(allowed)  # the neighbour row is unconstrained


def test_sampler_masks_only_the_rows_that_ask():
    torch.manual_seed(0)
    logits = torch.randn(3, 64)
    allowed = [3, 9, 40]
    params = [SamplingParams(temperature=0, allowed_token_ids=allowed), SamplingParams(temperature=0),
              SamplingParams(temperature=1.0, allowed_token_ids=[11])]
    requests = [Request(f"r{i}", [0], p) for i, p in enumerate(params)]
    md = SamplingMetadata.from_requests(requests, 64)
    tokens = Sampler()(logits, md).sampled_token_ids.tolist()
    assert tokens[0] == allowed[int(logits[0, allowed].argmax())]
    assert tokens[1] == int(logits[1].argmax())
    assert tokens[2] == 11
    plain = SamplingMetadata.from_requests([Request("p", [0], SamplingParams(temperature=0))], 64)
    assert plain.allowed_token_ids_mask is None and plain.bad_words_block is None


# ---- bad_words ------------------------------------------------------------------------------------

def test_bad_words_are_tokenized_as_vllm_does(hf_tokenizer, llm):
    tokenizer = llm.get_tokenizer()
    words = ["better", " than", "ugly.", "Explicit is"]
    want = [seq for w in words for seq in vllm_variants(hf_tokenizer, w)]
    assert tokenize_bad_words(words, tokenizer, VOCAB) == want
    assert any(len(seq) > 1 for seq in want)
    with pytest.raises(ValueError, match="vocabulary size") as err:
        tokenize_bad_words(["better"], tokenizer, 3)
    assert err.value.param == "bad_words"


def test_single_token_bad_word_is_never_produced(llm, reference, hf_tokenizer):
    prompt_ids = hf_tokenizer.encode(PROMPT)
    before = greedy(llm, {"prompt_token_ids": prompt_ids})
    # The first greedy token that decodes to letters whose own tokenization is that one token.
    word, token = next((w, t) for t in before for w in [hf_tokenizer.decode([t])]
                       if w.strip().isalpha() and [t] in vllm_variants(hf_tokenizer, w))
    sequences = vllm_variants(hf_tokenizer, word)
    after = greedy(llm, {"prompt_token_ids": prompt_ids}, bad_words=[word])
    assert token in before and token not in after
    assert after == reference_greedy_with_bad_words(reference, prompt_ids, sequences, 12)


def test_multi_token_bad_word_bans_its_last_token_only_after_its_prefix(llm, reference, hf_tokenizer):
    prompt_ids = hf_tokenizer.encode(PROMPT)
    before = greedy(llm, {"prompt_token_ids": prompt_ids})
    # Two consecutive greedy tokens whose (printable) text tokenizes back to exactly them.
    j, word = next((j, w) for j in range(1, len(before)) for w in [hf_tokenizer.decode(before[j - 1:j + 1])]
                   if w.isprintable() and vllm_variants(hf_tokenizer, w)[0] == before[j - 1:j + 1])
    sequences = vllm_variants(hf_tokenizer, word)
    after = greedy(llm, {"prompt_token_ids": prompt_ids}, bad_words=[word])
    assert after[:j] == before[:j]  # nothing changes until the prefix has been generated
    assert after[j] != before[j]  # then its last token is banned
    assert after == reference_greedy_with_bad_words(reference, prompt_ids, sequences, 12)


def test_bad_word_prefix_counts_output_tokens_only():
    """vLLM matches the prefix against generated tokens: a prompt ending in it bans nothing."""
    logits = torch.zeros(4, 16)
    logits[:, 7] = 5.0  # token 7 wins unless banned
    outputs = [[3, 5], [5, 6], [], [2]]
    requests = []
    for i, out in enumerate(outputs):
        req = Request(f"r{i}", [1, 5], SamplingParams(temperature=0))
        req.bad_words_token_ids = [[5, 7]] if i < 3 else [[7]]
        for token in out:
            req.append_output_token_id(token)
        requests.append(req)
    tokens = Sampler()(logits, SamplingMetadata.from_requests(requests, 16)).sampled_token_ids.tolist()
    assert tokens[0] != 7  # output ends with the prefix 5
    assert tokens[1] == 7  # it does not
    assert tokens[2] == 7  # the prompt's 5 does not count
    assert tokens[3] != 7  # a one-token word is always banned


# ---- truncate_prompt_tokens -----------------------------------------------------------------------

def test_truncation_equals_running_the_last_k_tokens(llm):
    prompt_ids = list(range(10, 60))
    k = 7
    full = llm.generate({"prompt_token_ids": prompt_ids},
                        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, truncate_prompt_tokens=k),
                        use_tqdm=False)[0]
    alone = llm.generate({"prompt_token_ids": prompt_ids[-k:]},
                         SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    assert full.prompt_token_ids == prompt_ids[-k:]
    assert full.outputs[0].token_ids == alone.outputs[0].token_ids


def test_truncation_of_text_and_before_the_length_check(llm, hf_tokenizer):
    ids = hf_tokenizer.encode(PROMPT)
    out = llm.generate(PROMPT, SamplingParams(max_tokens=2, truncate_prompt_tokens=4), use_tqdm=False)[0]
    assert out.prompt_token_ids == ids[-4:]
    # A prompt longer than max_model_len (256) runs once cut; -1 keeps max_model_len tokens.
    long_ids = [5 + i % 400 for i in range(300)]
    out = llm.generate({"prompt_token_ids": long_ids}, SamplingParams(max_tokens=2, truncate_prompt_tokens=10),
                       use_tqdm=False)[0]
    assert out.prompt_token_ids == long_ids[-10:]
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=2, truncate_prompt_tokens=-1),
                       use_tqdm=False)[0]
    assert out.prompt_token_ids == ids


# ---- validation -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,param,message", [
    ({"allowed_token_ids": []}, "allowed_token_ids", "is not None and empty"),
    ({"allowed_token_ids": [3, -1]}, "allowed_token_ids", "out-of-vocab"),
    ({"bad_words": ["ok", ""]}, "bad_words", "empty string"),
    ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens", ">= 1 or -1"),
    ({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens", ">= 1 or -1"),
    ({"truncate_prompt_tokens": 2.5}, "truncate_prompt_tokens", ">= 1 or -1"),
])
def test_sampling_params_refuse_bad_values(kwargs, param, message):
    with pytest.raises(ValueError, match=message) as err:
        SamplingParams(**kwargs)
    assert err.value.param == param


@pytest.mark.parametrize("kwargs,param,message", [
    ({"allowed_token_ids": [3, VOCAB]}, "allowed_token_ids", "out-of-vocab"),
    ({"truncate_prompt_tokens": 257}, "truncate_prompt_tokens", "greater than max_model_len"),
])
def test_engine_refuses_values_beyond_the_model(llm, kwargs, param, message):
    with pytest.raises(ValueError, match=message) as err:
        llm.generate(PROMPT, SamplingParams(max_tokens=2, **kwargs), use_tqdm=False)
    assert err.value.param == param
    assert not llm.engine.has_unfinished_requests()
