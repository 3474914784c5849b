"""`verify` on synthetic logits: greedy acceptance, and the emitted tokens' distribution (chi-square)."""

import pytest
import torch
from scipy.stats import chisquare

from ember.request import Request
from ember.sampling.metadata import SamplingMetadata
from ember.sampling.sampler import Sampler
from ember.sampling_params import SamplingParams
from ember.spec_decode.rejection_sampler import expand_rows, verify


def make_requests(n, **params):
    return [Request(str(i), [1, 2, 3], SamplingParams(**params)) for i in range(n)]


def run_verify(requests, logits, drafts):
    rows = expand_rows(requests, drafts)
    md = SamplingMetadata.from_requests(rows, logits.shape[1])
    return verify(Sampler(), logits, md, drafts)


def test_greedy_accepts_the_argmax_prefix_then_emits_the_target_token():
    vocab = 10
    # Request 0: drafts [4, 7, 1]; argmax per row 4, 7, 2, 9 -> accepts 4, 7, then emits 2.
    # Request 1: no drafts, argmax 5.  Request 2: drafts [3]; argmax 3 then 8 -> all accepted + bonus 8.
    argmax = [4, 7, 2, 9, 5, 3, 8]
    logits = torch.randn(len(argmax), vocab)
    logits[torch.arange(len(argmax)), argmax] = 10.0
    out, counts = run_verify(make_requests(3, temperature=0.0), logits, [[4, 7, 1], [], [3]])
    assert counts == [3, 1, 2]
    assert out.sampled_token_ids.tolist() == [4, 7, 2, 5, 3, 8]


def test_greedy_logprobs_are_the_targets_at_each_emitted_row():
    logits = torch.randn(3, 16)
    logits[0, 5] = logits[1, 6] = logits[2, 7] = 20.0
    out, counts = run_verify(make_requests(1, temperature=0.0, logprobs=2), logits, [[5, 6]])
    assert counts == [3]
    expected = torch.log_softmax(logits, -1)
    assert torch.allclose(out.logprobs[:, 0], expected[[0, 1, 2], [5, 6, 7]])
    assert out.sampled_token_ranks.tolist() == [1, 1, 1]


@pytest.mark.parametrize("params, draft", [
    ({}, 2),  # the draft holds 0.30 of the mass
    ({}, 5),  # an unlikely draft (0.02)
    ({"top_k": 3}, 2),  # top-k keeps 0, 1, 2
    ({"top_k": 3}, 5),  # the draft is outside the top-k: never accepted
    ({"top_p": 0.7}, 1),
])
def test_emitted_tokens_follow_the_target_distribution(params, draft):
    """Rejection sampling of a one-hot draft: the first emitted token is distributed as the target's
    processed distribution, whether the draft was accepted or a replacement sampled."""
    torch.manual_seed(0)
    p = torch.tensor([0.35, 0.2, 0.3, 0.1, 0.03, 0.02])
    num = 20000
    logits = p.log().repeat(2 * num, 1)  # row 0: the draft's position; row 1: the bonus
    requests = make_requests(num, temperature=1.0, **params)
    out, counts = run_verify(requests, logits, [[draft]] * num)
    starts = torch.tensor([0] + counts[:-1]).cumsum(0)
    first = out.sampled_token_ids[starts]
    target = p.clone()
    if "top_k" in params:
        target[3:] = 0
    if "top_p" in params:
        target[[3, 4, 5]] = 0  # 0.35 + 0.3 + 0.2 reaches 0.7 at token 1
    target /= target.sum()
    observed = torch.bincount(first, minlength=len(p)).double()
    assert observed[target == 0].sum() == 0
    keep = target > 0
    assert chisquare(observed[keep].numpy(), (target[keep] * num).numpy()).pvalue > 0.01
    accepted = torch.tensor(counts) == 2
    assert abs(accepted.double().mean() - target[draft]) < 0.02  # acceptance is p(draft)


def test_seeded_rows_are_reproducible():
    logits = torch.randn(4, 32)
    tokens = []
    for _ in range(2):
        requests = make_requests(2, temperature=1.0, seed=7)
        out, counts = run_verify(requests, logits, [[3], [4]])
        tokens.append((out.sampled_token_ids.tolist(), counts))
    assert tokens[0] == tokens[1]
