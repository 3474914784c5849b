"""Precision search on a tiny random Llama: plans are scored by a real forward, the choice is the smallest
feasible plan among those evaluated, and the model is left as it was."""
import copy
import math

import pytest
import torch

from ember.analysis.precision_search import (Candidate, PlanEvaluator, pareto_front, search_precisions,
                                             tiered_plan, verified_search, write_candidates_csv, written_dppl)
from ember.kernels.linear.spec import WeightScheme
from ember.quant.plan import decoder_ops, op_shapes, op_weight_bytes
from ember.quant.rtn import fake_quantize

from quant_models import make_tiny_llama


@pytest.fixture(scope="module")
def setup():
    model = make_tiny_llama(hidden=64, intermediate=128, layers=3)
    torch.manual_seed(2)  # text the model itself samples: any perturbation raises its perplexity on average
    with torch.no_grad():
        batches = [model.generate(torch.randint(0, 256, (2, 1)), do_sample=True, max_new_tokens=23, min_new_tokens=23,
                                  pad_token_id=0) for _ in range(3)]
    return model, batches, PlanEvaluator(model, batches, group_size=32, method="rtn")


def _hf_ppl(model, batches, plan, score_from=0):
    scheme = {"int4": WeightScheme(4, 32, True), "int8": WeightScheme(8, None, True)}
    quantized = copy.deepcopy(model)
    for ref, precision in plan.items():
        for name in ref.linear_names():
            lin = quantized.get_submodule(name)
            if precision != "bf16":
                lin.weight.data = fake_quantize(lin.weight, scheme[precision])
    nll, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logits = quantized(batch).logits[:, :-1]
            targets = batch[:, 1:]
            keep = torch.arange(1, batch.shape[1]) >= score_from  # target positions counted
            nll += float(torch.nn.functional.cross_entropy(logits[:, keep].reshape(-1, logits.shape[-1]),
                                                           targets[:, keep].reshape(-1), reduction="sum"))
            count += targets[:, keep].numel()
    return math.exp(nll / count)


def test_candidate_scores_equal_a_direct_forward(setup):
    model, batches, evaluator = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ranking = decoder_ops(3)[::-1]
    for j, k in ((0, 0), (2, 3), (0, 12)):
        plan = tiered_plan(ranking, j, k)
        cand = evaluator.evaluate(plan)
        assert cand.ppl == pytest.approx(_hf_ppl(model, batches, plan), rel=1e-5)
        assert cand.counts() == {"bf16": j, "int8": k, "int4": 12 - j - k}
        shapes = op_shapes(model, plan)
        assert cand.weight_bytes == sum(op_weight_bytes(shapes[r], p, 32) for r, p in plan.items())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert evaluator.evaluate(tiered_plan(ranking, 12, 0)).dppl == pytest.approx(0.0, abs=1e-9)


def test_search_returns_the_smallest_feasible_plan(setup, tmp_path):
    _, _, evaluator = setup
    ranking = decoder_ops(3)
    all_int4 = evaluator.evaluate(tiered_plan(ranking, 0, 0))
    bound = all_int4.dppl / 2  # somewhere between all-int4 and float
    best, candidates = search_precisions(evaluator, ranking, bound, bf16_counts=(0, 1, 2))
    feasible = [c for c in candidates if c.dppl <= bound]
    assert best is not None and best.dppl <= bound
    assert best.weight_bytes == min(c.weight_bytes for c in feasible)
    assert best.weight_bytes < evaluator.weight_bytes(tiered_plan(ranking, 0, len(ranking)))  # below all-int8
    loose, _ = search_precisions(evaluator, ranking, all_int4.dppl + 1.0, bf16_counts=(0,))
    assert loose.counts() == {"int4": 12, "int8": 0, "bf16": 0}
    impossible, tried = search_precisions(evaluator, ranking, -1.0, bf16_counts=(0,))
    assert impossible is None and len(tried) == 1
    write_candidates_csv(candidates, str(tmp_path / "c.csv"))
    assert len((tmp_path / "c.csv").read_text().splitlines()) == len(candidates) + 1


def test_plans_are_scored_on_other_windows_from_a_position(setup):
    model, batches, _ = setup
    torch.manual_seed(3)
    with torch.no_grad():
        windows = [model.generate(torch.randint(0, 256, (1, 1)), do_sample=True, max_new_tokens=31,
                                  min_new_tokens=31, pad_token_id=0) for _ in range(2)]
    evaluator = PlanEvaluator(model, batches, group_size=32, method="rtn", score_windows=windows, score_from=16)
    plan = tiered_plan(decoder_ops(3), 1, 4)
    assert evaluator.evaluate(plan).ppl == pytest.approx(_hf_ppl(model, windows, plan, score_from=16), rel=1e-5)
    assert math.exp(evaluator.base_nll) == pytest.approx(_hf_ppl(model, windows, {}, score_from=16), rel=1e-5)


def test_written_model_scores_as_its_rtn_candidate(setup):
    """RTN quantizes each op alone, so the model `quantize_model` writes for a plan must score what the
    candidate built from fake-quantized weights scored."""
    from ember.quant import QuantConfig

    model, _, evaluator = setup
    plan = tiered_plan(decoder_ops(3)[::-1], 2, 5)
    written = written_dppl(evaluator, QuantConfig(method="rtn", bits=4, group_size=32), plan)
    assert written == pytest.approx(evaluator.evaluate(plan).dppl, abs=1e-3)
    assert written > 0.01


def test_verified_search_lowers_the_bound_by_the_measured_gap(setup):
    _, _, evaluator = setup
    ranking = decoder_ops(3)
    all_int4 = evaluator.evaluate(tiered_plan(ranking, 0, 0))
    bound, gap = all_int4.dppl / 2, all_int4.dppl / 6
    written = lambda c: c.dppl + gap * (c.counts()["int4"] > 0)  # noqa: E731 - stand-ins miss the int4 error by gap
    best, candidates = verified_search(evaluator, ranking, bound, written, bf16_counts=(0,))
    checked = [c for c in candidates if c.written_dppl is not None]
    assert best is not None and best.written_dppl <= bound and best in checked
    assert len(checked) >= 2 and all(c.written_dppl > bound for c in checked if c is not best)  # the first missed
    plain, _ = search_precisions(evaluator, ranking, bound, bf16_counts=(0,))
    assert best.weight_bytes > plain.weight_bytes  # paid for the gap with more int8 ops
    never, tried = verified_search(evaluator, ranking, bound, lambda c: bound + 1, bf16_counts=(0,), max_rounds=3)
    assert never is None and sum(c.written_dppl is not None for c in tried) <= 3


def test_pareto_front():
    make = lambda b, p: Candidate({}, b, p, 0.0, f"{b}")  # noqa: E731
    cands = [make(10, 5.0), make(20, 4.0), make(15, 6.0), make(30, 4.5), make(40, 3.0)]
    assert [c.weight_bytes for c in pareto_front(cands)] == [10, 20, 40]


def test_evaluator_quantizes_with_the_method_args(setup):
    # GPTQ's clip search reaches the int4 candidates (4-bit only); the int8 ones are GPTQ's plain per-channel
    model, batches, _ = setup
    plain = PlanEvaluator(model, batches, group_size=32, method="gptq")
    clipped = PlanEvaluator(model, batches, group_size=32, method="gptq", method_args={"clip_search": True})
    ref = decoder_ops(3)[0]
    assert not torch.equal(plain.weights[(ref, "int4")][0], clipped.weights[(ref, "int4")][0])
    assert torch.equal(plain.weights[(ref, "int8")][0], clipped.weights[(ref, "int8")][0])
