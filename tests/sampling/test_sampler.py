"""Sampler tests against Hugging Face logits processors, closed-form examples and statistics."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ember.request import Request
from ember.sampling import Sampler, SamplingMetadata
from ember.sampling_params import SamplingParams

# Upper 0.1% quantiles of the chi-square distribution, by degrees of freedom.
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def make_requests(params: list[SamplingParams], prompts: list[list[int]] | None = None,
                  outputs: list[list[int]] | None = None, eos_token_id: int | None = None) -> list[Request]:
    reqs = []
    for i, p in enumerate(params):
        req = Request(f"r{i}", prompts[i] if prompts else [0], p, eos_token_id=eos_token_id)
        for token_id in (outputs[i] if outputs else []):
            req.append_output_token_id(token_id)
        reqs.append(req)
    return reqs


def hf_warp(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """One row [V] through transformers' warpers, in the sampler's order."""
    scores = row.unsqueeze(0).clone()
    warpers = [TemperatureLogitsWarper(p.temperature)]
    if p.min_p > 0:
        warpers.append(MinPLogitsWarper(p.min_p))
    if p.top_k > 0:
        warpers.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        warpers.append(TopPLogitsWarper(p.top_p))
    input_ids = torch.zeros(1, 1, dtype=torch.long)
    for warper in warpers:
        scores = warper(input_ids, scores)
    return scores.squeeze(0)


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


MIXED_WARPERS = [
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=1.0, min_p=0.1),
    SamplingParams(temperature=0.5, top_k=20, top_p=0.9, min_p=0.02),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=2.0, top_k=1),
    SamplingParams(temperature=0.9, top_p=0.3),
    SamplingParams(temperature=1.1, min_p=1.0),  # keeps exactly the most likely token
]
TOP_K_ONLY = [SamplingParams(temperature=0.8, top_k=5), SamplingParams(temperature=1.2),
              SamplingParams(temperature=1.0, top_k=17), SamplingParams(temperature=0.6, top_k=64)]


@pytest.mark.parametrize("num_top_p_candidates", [4, 256])
@pytest.mark.parametrize("params", [MIXED_WARPERS, TOP_K_ONLY], ids=["top_p", "top_k_only"])
def test_warpers_match_transformers(params, num_top_p_candidates):
    torch.manual_seed(0)
    logits = torch.randn(len(params), 64) * 3  # [B, V]
    md = SamplingMetadata.from_requests(make_requests(params), vocab_size=64)
    warped = Sampler(num_top_p_candidates).apply_warpers(logits, md)
    assert_same_as_transformers(warped, logits, params)


def test_top_p_on_candidates_matches_transformers():
    """Peaked rows whose nucleus fits in the candidates: the vocabulary is never fully ranked."""
    torch.manual_seed(5)
    logits = torch.randn(5, 512)
    logits[:, :20] += 8.0  # a nucleus of about 20 tokens, like a confident LM
    params = [SamplingParams(top_p=p) for p in (0.5, 0.9, 0.97)] + [
        SamplingParams(top_k=30, top_p=0.9), SamplingParams(temperature=0.8)]
    md = SamplingMetadata.from_requests(make_requests(params), vocab_size=512)
    warped = Sampler(num_top_p_candidates=32).apply_warpers(logits, md)
    assert_same_as_transformers(warped, logits, params)
    assert int(torch.isfinite(warped[:4]).sum(dim=-1).max()) <= 32
    assert torch.isfinite(warped[4]).all()  # top_p = 1 filters nothing


def assert_same_as_transformers(warped: torch.Tensor, logits: torch.Tensor,
                                params: list[SamplingParams]) -> None:
    for row, p in enumerate(params):
        ref = hf_warp(logits[row], p)
        kept = torch.isfinite(warped[row])
        assert torch.equal(kept, torch.isfinite(ref)), f"row {row}: surviving tokens differ"
        torch.testing.assert_close(warped[row][kept], ref[kept])


def test_repetition_penalty_matches_transformers():
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.5),
              SamplingParams(temperature=0.8, repetition_penalty=0.7),
              SamplingParams(temperature=1.0),
              SamplingParams(temperature=0.0, repetition_penalty=2.0)]
    prompts = [[1, 4, 4, 9], [2, 3], [5, 6, 7], [0, 31]]
    outputs = [[9, 12], [3, 3, 20], [1], []]
    torch.manual_seed(1)
    logits = torch.randn(4, 32) * 2
    md = SamplingMetadata.from_requests(make_requests(params, prompts, outputs), vocab_size=32)
    processed = Sampler().apply_processors(logits, md)
    for row, p in enumerate(params):
        ids = torch.tensor([prompts[row] + outputs[row]])
        ref = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, logits[row:row + 1].clone())
        torch.testing.assert_close(processed[row], ref[0])


def test_presence_frequency_hand_computed():
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5, 0.0, 3.0]] * 3)
    params = [SamplingParams(frequency_penalty=0.5, presence_penalty=0.25),
              SamplingParams(),
              SamplingParams(frequency_penalty=0.5, repetition_penalty=2.0)]
    prompts = [[5], [5], [5, 2]]
    outputs = [[1, 1, 3], [1, 1, 3], [1, 1, 3]]
    md = SamplingMetadata.from_requests(make_requests(params, prompts, outputs), vocab_size=6)
    processed = Sampler().apply_processors(logits, md)
    # Row 0: prompt tokens are not penalized; token 1 seen twice, token 3 once.
    expected0 = [1.0, 2.0 - 0.5 * 2 - 0.25, -1.0, 0.5 - 0.5 - 0.25, 0.0, 3.0]
    # Row 2: repetition on prompt+output first (divide positive, multiply negative), then frequency.
    expected2 = [1.0, 2.0 / 2 - 0.5 * 2, -1.0 * 2, 0.5 / 2 - 0.5, 0.0, 3.0 / 2]
    torch.testing.assert_close(processed, torch.tensor([expected0, logits[1].tolist(), expected2]))


def test_greedy_is_argmax():
    torch.manual_seed(2)
    logits = torch.randn(5, 50)
    md = SamplingMetadata.from_requests(make_requests([SamplingParams(temperature=0.0)] * 5), 50)
    out = Sampler()(logits, md)
    assert torch.equal(out.sampled_token_ids, logits.argmax(dim=-1))
    assert out.logprobs is None and out.logprob_token_ids is None and out.sampled_token_ranks is None
    # Mixed batch: greedy rows are the argmax of the processed logits, whatever the random rows do.
    params = [SamplingParams(temperature=0.0, logit_bias={7: 4.0}, frequency_penalty=1.0),
              SamplingParams(temperature=1.5, top_k=3),
              SamplingParams(temperature=0.0, repetition_penalty=1.8, seed=5),
              SamplingParams(temperature=0.9, top_p=0.5)]
    reqs = make_requests(params, prompts=[[1, 2]] * 4, outputs=[[3, 3, 4]] * 4)
    md = SamplingMetadata.from_requests(reqs, 50)
    sampler = Sampler()
    expected = sampler.apply_processors(logits[:4], md).argmax(dim=-1)
    out = sampler(logits[:4], md)
    assert out.sampled_token_ids[0] == expected[0] and out.sampled_token_ids[2] == expected[2]


def run_steps(seed_position: int, others: list[SamplingParams], table: torch.Tensor) -> list[int]:
    """Sample len(table) steps of one seeded request placed among `others`; return its tokens."""
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)
    params = others[:seed_position] + [seeded] + others[seed_position:]
    reqs = make_requests(params)
    noise_gen = torch.Generator().manual_seed(99)
    sampler, tokens = Sampler(), []
    for step_logits in table:
        logits = torch.randn(len(params), table.shape[1], generator=noise_gen)
        logits[seed_position] = step_logits
        md = SamplingMetadata.from_requests(reqs, table.shape[1])
        token = int(sampler(logits, md).sampled_token_ids[seed_position])
        reqs[seed_position].append_output_token_id(token)
        tokens.append(token)
    return tokens


def test_seeded_rows_ignore_batch_composition():
    table = torch.randn(20, 100, generator=torch.Generator().manual_seed(3))  # [steps, V]
    alone = run_steps(0, [], table)
    others = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.5, top_k=4, seed=7), SamplingParams(min_p=0.1)]
    assert run_steps(2, others, table) == alone
    assert run_steps(4, others, table) == alone
    assert len(set(alone)) > 1  # the row really samples


def test_sampling_frequencies_match_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    temperature, num_draws = 0.7, 4000
    reqs = make_requests([SamplingParams(temperature=temperature)] * num_draws)
    md = SamplingMetadata.from_requests(reqs, 8)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tokens = Sampler()(logits.expand(num_draws, 8), md).sampled_token_ids
    counts = torch.bincount(tokens, minlength=8).float()
    assert chi_square(counts, torch.softmax(logits / temperature, dim=-1)) < CHI2_999[7]


def test_seeded_filtered_frequencies_match_transformers():
    """Per-row generators and top-k/top-p together: draws follow HF's warped distribution."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    p = SamplingParams(temperature=1.2, top_k=6, top_p=0.9)
    num_draws = 3000
    reqs = make_requests([p.clone(seed=s) for s in range(num_draws)])
    md = SamplingMetadata.from_requests(reqs, 8)
    tokens = Sampler()(logits.expand(num_draws, 8), md).sampled_token_ids
    ref_probs = torch.softmax(hf_warp(logits, p), dim=-1)
    counts = torch.bincount(tokens, minlength=8).float()
    kept = ref_probs > 0
    assert counts[~kept].sum() == 0
    assert chi_square(counts[kept], ref_probs[kept]) < CHI2_999[int(kept.sum()) - 1]


def test_logprobs_are_raw_log_softmax_with_ranks():
    torch.manual_seed(4)
    logits = torch.randn(4, 40) * 2
    params = [SamplingParams(temperature=0.0, logprobs=3, logit_bias={0: 50.0}),
              SamplingParams(temperature=1.5, logprobs=1, repetition_penalty=1.3),
              SamplingParams(temperature=0.8, top_k=10),
              SamplingParams(temperature=1.0, logprobs=0, presence_penalty=1.0)]
    md = SamplingMetadata.from_requests(make_requests(params, outputs=[[5, 6]] * 4), 40)
    assert md.max_num_logprobs == 3
    out = Sampler()(logits, md)
    ref = torch.log_softmax(logits, dim=-1)  # raw: before bias, penalties and temperature
    sampled = out.sampled_token_ids
    assert sampled[0] == 0  # the bias decided the token, yet its logprob stays raw
    assert out.logprob_token_ids.shape == (4, 4) and out.logprobs.shape == (4, 4)
    assert torch.equal(out.logprob_token_ids[:, 0], sampled)
    torch.testing.assert_close(out.logprobs[:, 0], ref.gather(1, sampled[:, None]).squeeze(1))
    top_values, top_ids = ref.sort(dim=-1, descending=True)
    assert torch.equal(out.logprob_token_ids[:, 1:], top_ids[:, :3])
    torch.testing.assert_close(out.logprobs[:, 1:], top_values[:, :3])
    ranks = (top_ids == sampled[:, None]).float().argmax(dim=-1) + 1  # position in sorted order
    assert torch.equal(out.sampled_token_ranks, ranks)


def test_logprobs_zero_gives_only_sampled_token():
    logits = torch.tensor([[0.0, 3.0, 1.0]])
    md = SamplingMetadata.from_requests(make_requests([SamplingParams(temperature=0.0, logprobs=0)]), 3)
    out = Sampler()(logits, md)
    assert out.logprob_token_ids.tolist() == [[1]] and out.sampled_token_ranks.tolist() == [1]


def test_min_tokens_blocks_eos_and_stop_ids():
    eos, stop = 9, 8
    logits = torch.zeros(4, 10)
    logits[:, eos], logits[:, stop] = 20.0, 19.0
    params = [SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[stop]),
              SamplingParams(temperature=1.0, min_tokens=3, stop_token_ids=[stop], ignore_eos=True),
              SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[stop])]
    reqs = make_requests(params, outputs=[[1], [1, 2], [], [1, 2, 3]], eos_token_id=eos)
    md = SamplingMetadata.from_requests(reqs, 10)
    processed = Sampler().apply_processors(logits, md)
    assert torch.isneginf(processed[:2, [stop, eos]]).all()
    assert torch.equal(processed[2:], logits[2:])  # no min_tokens / already past it
    tokens = Sampler()(logits, md).sampled_token_ids.tolist()
    assert tokens[0] not in (stop, eos) and tokens[1] not in (stop, eos)
    assert tokens[2] == eos and tokens[3] == eos


def test_logit_bias_shifts_and_validates():
    logits = torch.tensor([[0.0, 1.0, 2.0, 0.5], [0.0, 1.0, 2.0, 0.5]])
    params = [SamplingParams(temperature=0.0, logit_bias={3: 5.0}),
              SamplingParams(temperature=0.0, logit_bias={2: -1.5, 0: 0.25})]
    md = SamplingMetadata.from_requests(make_requests(params), 4)
    processed = Sampler().apply_processors(logits, md)
    assert processed.tolist() == [[0.0, 1.0, 2.0, 5.5], [0.25, 1.0, 0.5, 0.5]]
    assert Sampler()(logits, md).sampled_token_ids.tolist() == [3, 1]
    assert logits.tolist() == [[0.0, 1.0, 2.0, 0.5]] * 2  # input untouched
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingMetadata.from_requests(make_requests([SamplingParams(logit_bias={4: 1.0})]), 4)


def test_metadata_leaves_unused_features_empty():
    reqs = make_requests([SamplingParams(temperature=0.0, seed=3, top_k=5)] * 3)
    md = SamplingMetadata.from_requests(reqs, 16)
    assert md.all_greedy and not md.all_random and not md.needs_processing
    assert md.temperature is None and md.top_k is None and md.top_p is None and md.min_p is None
    assert md.generators == {} and md.max_num_logprobs is None
    mixed = make_requests([SamplingParams(temperature=0.0, seed=1), SamplingParams(seed=2),
                           SamplingParams(temperature=0.5, top_p=0.9)])
    md = SamplingMetadata.from_requests(mixed, 16)
    assert not md.all_greedy and not md.all_random
    assert list(md.generators) == [1]  # greedy rows never draw noise
    assert md.top_k is None and md.top_p.tolist() == pytest.approx([1.0, 1.0, 0.9])
    assert md.temperature.tolist() == pytest.approx([0.0, 1.0, 0.5])
