"""Precision search on a tiny random Llama: plans are scored by a real forward, the choice is the smallest
feasible plan among those evaluated, and the model is left as it was."""
import copy
import math

import pytest
import torch

from ember.analysis.precision_search import (Candidate, PlanEvaluator, pareto_front, search_precisions,
                                             tiered_plan, write_candidates_csv)
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


def _hf_ppl(model, batches, plan):
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
            nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                           batch[:, 1:].reshape(-1), reduction="sum"))
            count += batch[:, 1:].numel()
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


def test_pareto_front():
    make = lambda b, p: Candidate({}, b, p, 0.0, f"{b}")  # noqa: E731
    cands = [make(10, 5.0), make(20, 4.0), make(15, 6.0), make(30, 4.5), make(40, 3.0)]
    assert [c.weight_bytes for c in pareto_front(cands)] == [10, 20, 40]
