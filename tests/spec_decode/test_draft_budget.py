"""The draft plan (spec_decode/draft_budget.py): acceptance estimates, measured step costs, the plan's
guarantees, and the engine verifying what the plan keeps."""

import random

import pytest

from ember import LLM, SamplingParams
from ember.sampling_params import StructuredOutputsParams
from ember.spec_decode.config import SpeculativeConfig
from ember.spec_decode.draft_budget import AcceptanceEstimate, StepCosts, plan_drafts


class FixedCosts(StepCosts):
    """Step seconds from a formula instead of measurements (`observe` only records the row counts)."""

    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds
        self.observed = []

    def observe(self, num_rows, seconds):
        self.observed.append(num_rows)

    def estimate(self, num_rows):
        return self.seconds(num_rows)

    def estimates(self, first, last):
        return [self.seconds(rows) for rows in range(first, last + 1)]


def expected_tokens(rate, drafts):
    return sum(rate ** j for j in range(drafts + 1))


def test_acceptance_estimate_finds_the_per_token_chance_of_geometric_rounds():
    rng = random.Random(0)
    for chance in (0.2, 0.5, 0.8):
        estimate, rates = AcceptanceEstimate(), []
        for _ in range(3000):
            accepted = 0
            while accepted < 4 and rng.random() < chance:
                accepted += 1
            estimate.record(4, accepted)
            rates.append(estimate.rate)
        assert abs(sum(rates[500:]) / len(rates[500:]) - chance) < 0.05


def test_step_costs_average_each_row_count_and_fill_the_gaps():
    costs = StepCosts()
    costs.observe(4, 0.050)  # a row count's first step (it builds that count's decode loop) is dropped
    assert costs.estimate(3) is None
    costs.observe(4, 0.010)
    costs.observe(12, 0.030)
    costs.observe(12, 0.020)
    assert costs.estimate(8) == pytest.approx(0.015)  # between two measured counts: on the line
    assert costs.estimate(2) == pytest.approx(0.005)  # below: in proportion to the rows
    assert costs.estimate(30) == pytest.approx(0.020)  # above: the largest's time
    costs.observe(4, 0.020)
    assert costs.estimate(4) == pytest.approx(0.012)  # an average, a fifth of the way to the new step
    costs.observe(4, 1.0)  # a stall counts as twice the average
    assert costs.estimate(4) == pytest.approx(0.012 + 0.2 * 0.012)
    costs.observe(20, 0.04)
    costs.observe(20, 0.04)
    assert costs.estimates(1, 30) == pytest.approx([costs.estimate(rows) for rows in range(1, 31)])


def plan(num_decoding, rates, max_drafts, costs, protected=None, idle=0, slowdown=0.05):
    return plan_drafts(num_decoding, rates, max_drafts, costs, slowdown, protected or [False] * len(rates), idle)


def test_without_a_measured_step_every_request_drafts_its_maximum():
    assert plan(3, [0.1, 0.9], [4, 2], StepCosts(), idle=1) == [4, 2]


def test_free_rows_verify_every_draft_and_rows_that_cost_in_proportion_none():
    assert plan(3, [0.3, 0.9], [4, 4], FixedCosts(lambda rows: 0.01), idle=1) == [4, 4]
    proportional = FixedCosts(lambda rows: 0.001 * rows)
    assert plan(1, [0.95], [4], proportional) == [0]  # E(k) < 1 + k: a step without drafts is faster
    assert plan(3, [0.95, 0.95], [4, 4], proportional) == [0, 0]


def test_the_most_likely_drafts_go_first_until_a_row_costs_more_than_it_gives():
    # 10 ms up to 10 rows, then 1 ms a row: past 10 rows a draft pays only if its chance beats tokens / rows
    costs = FixedCosts(lambda rows: 0.010 + 0.001 * max(0, rows - 10))
    drafts = plan(4, [0.9, 0.5, 0.2], [4, 4, 4], costs)
    gains = sorted(((r ** j, i) for i, r in enumerate([0.9, 0.5, 0.2]) for j in range(1, 5)), reverse=True)
    best = max(range(len(gains) + 1),
               key=lambda n: (4 + sum(g for g, _ in gains[:n])) / costs.estimate(4 + n))
    assert sum(drafts) == best and drafts[0] == 4 and drafts[2] <= drafts[1]


def test_a_request_that_cannot_gain_caps_the_rows_the_others_may_add():
    # 8 decoding requests, 7 copying (acceptance 0.9), 10 ms a step up to 10 rows, then 0.2 ms a row:
    # unprotected they take every draft; with a protected eighth in the step, it may be slowed by 5% at
    # most, so the step stays under 10.53 ms: 12 rows.
    costs = FixedCosts(lambda rows: 0.010 + 0.0002 * max(0, rows - 10))
    assert plan(8, [0.9] * 7, [4] * 7, costs) == [4] * 7
    assert sum(plan(8, [0.9] * 7, [4] * 7, costs, idle=1)) == 4
    # a protected candidate bounds the step by its own expected tokens: 1.3 with one draft of 0.3
    drafts = plan(8, [0.9] * 6 + [0.3], [4] * 6 + [1], costs, protected=[False] * 6 + [True])
    assert costs.estimate(8 + sum(drafts)) <= 0.010 / 0.95 * (1 + 0.3 * drafts[6]) and sum(drafts) > 4


@pytest.mark.parametrize("seed", range(100))
def test_no_protected_request_is_slowed_past_the_bound_and_the_goodput_never_drops(seed):
    rng = random.Random(seed)
    knee, slope, base = rng.randint(1, 40), rng.uniform(0.0, 2.0), rng.uniform(0.5, 20.0)
    costs = FixedCosts(lambda rows: base + slope * max(0, rows - knee))
    num_candidates = rng.randint(1, 8)
    num_decoding = num_candidates + rng.randint(0, 4)
    idle = rng.randint(0, num_decoding - num_candidates)
    rates = [rng.uniform(0.01, 0.99) for _ in range(num_candidates)]
    max_drafts = [rng.randint(1, 8) for _ in range(num_candidates)]
    protected = [rng.random() < 0.3 for _ in range(num_candidates)]
    slowdown = rng.choice([0.0, 0.05, 0.2])
    drafts = plan(num_decoding, rates, max_drafts, costs, protected, idle, slowdown)
    assert all(0 <= d <= m for d, m in zip(drafts, max_drafts))
    plain, step = costs.estimate(num_decoding), costs.estimate(num_decoding + sum(drafts))
    expected = [expected_tokens(r, d) for r, d in zip(rates, drafts)]
    for tokens in [e for e, p in zip(expected, protected) if p] + [1.0] * idle:
        assert tokens / step >= (1 - slowdown) / plain - 1e-12
    assert (sum(expected) + num_decoding - num_candidates) / step >= num_decoding / plain - 1e-12


def repeating_prompts(n, seed=0):
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        chunk = [rng.randint(3, 511) for _ in range(6)]
        prompts.append([rng.randint(3, 511) for _ in range(3)] + chunk * 3)
    return prompts


def run(tiny_llama_dir, seconds=None, grammar=False, **spec):
    """Greedy tokens of 4 repeating prompts (and, with `grammar`, a fifth request held to a regex), the
    speculation counters and the speculator."""
    llm = LLM(model=tiny_llama_dir, dtype="float32", max_model_len=256, num_kv_blocks=96,
              speculative_config={"method": "ngram", "num_speculative_tokens": 4, "min_acceptance_rate": 0.0, **spec})
    if seconds is not None:
        llm.engine.speculator.step_costs = FixedCosts(seconds)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts, all_params = repeating_prompts(4), [params] * 4
    if grammar:
        prompts.append([5, 6, 7])
        all_params.append(SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                         structured_outputs=StructuredOutputsParams(regex="(ab)+")))
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], all_params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs][:4], llm.engine.get_stats().spec_decoding, llm.engine.speculator


def test_the_engine_verifies_what_the_plan_keeps(tiny_llama_dir):
    tokens, whole, _ = run(tiny_llama_dir, draft_budget="max")
    assert whole.num_draft_tokens > 0 and whole.num_accepted_tokens > 0
    # free rows: every proposal is verified whole, as with "max"
    flat_tokens, flat, speculator = run(tiny_llama_dir, lambda rows: 0.01)
    assert flat_tokens == tokens and flat.as_dict() == whole.as_dict()
    # every observed step was a decode step: one row per request plus its drafts, never a 21-token prompt
    assert speculator.step_costs.observed and all(1 <= rows <= 4 * 5 for rows in speculator.step_costs.observed)
    # rows that cost in proportion: no draft pays, none is verified, and the tokens stay the same
    bound_tokens, bound, _ = run(tiny_llama_dir, lambda rows: 0.001 * rows)
    assert bound_tokens == tokens and bound.num_draft_tokens == 0


def test_a_request_with_a_grammar_caps_the_drafts_of_the_others(tiny_llama_dir):
    # 10 ms a step plus 1 ms a row: drafts of 0.9 chance pay (5 rows: 15 ms; 6 rows: 16 ms for ~5.9 tokens)
    seconds = lambda rows: 0.010 + 0.001 * rows  # noqa: E731
    tokens, alone, _ = run(tiny_llama_dir, seconds)
    assert alone.num_draft_tokens > 0
    # beside a request that cannot draft, a row (+1 ms on 15) slows it by more than 5%: no drafts at all
    with_grammar, capped, _ = run(tiny_llama_dir, seconds, grammar=True)
    assert with_grammar == tokens and capped.num_draft_tokens == 0
    # allowed to slow it by 20%, the others draft again
    _, looser, _ = run(tiny_llama_dir, seconds, grammar=True, max_request_slowdown=0.2)
    assert looser.num_draft_tokens > 0


def test_draft_budget_keys_are_checked():
    assert SpeculativeConfig.parse({"method": "ngram"}).draft_budget == "goodput"
    with pytest.raises(ValueError, match="draft_budget"):
        SpeculativeConfig.parse({"method": "ngram", "draft_budget": "all"})
    with pytest.raises(ValueError, match="max_request_slowdown"):
        SpeculativeConfig.parse({"method": "ngram", "max_request_slowdown": 1.0})


def test_a_failing_plan_costs_drafts_not_requests(tiny_llama_dir):
    tokens, _, _ = run(tiny_llama_dir, draft_budget="max")
    llm = LLM(model=tiny_llama_dir, dtype="float32", max_model_len=256, num_kv_blocks=96,
              speculative_config={"method": "ngram", "num_speculative_tokens": 4, "min_acceptance_rate": 0.0})
    costs, plans = FixedCosts(lambda rows: 0.01), [0]
    free_estimate = costs.estimate

    def estimate(rows):  # read once a plan, for the step without drafts: every other plan fails
        plans[0] += 1
        if plans[0] % 2:
            raise RuntimeError("injected plan fault")
        return free_estimate(rows)

    costs.estimate = estimate
    llm.engine.speculator.step_costs = costs
    outs = llm.generate([{"prompt_token_ids": p} for p in repeating_prompts(4)],
                        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == tokens
    assert plans[0] > 4 and llm.engine.get_stats().spec_decoding.num_accepted_tokens > 0
