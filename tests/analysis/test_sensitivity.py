"""Sensitivity analysis on a tiny random Llama: each op's KL and perplexity change equal a direct
Hugging Face forward of the whole model with that op alone fake-quantized."""
import copy
import math

import pytest
import torch

from ember.analysis.report import SensitivityReport, Thresholds, plot_report
from ember.analysis.sensitivity import analyze_sensitivity, make_quantizer
from ember.kernels.linear.spec import WeightScheme
from ember.quant.plan import OpRef
from ember.quant.rtn import fake_quantize

from quant_models import make_tiny_llama

SCHEME = WeightScheme(4, 32, True)


@pytest.fixture(scope="module")
def batches():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (2, 24), generator=gen) for _ in range(3)]


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(hidden=64, intermediate=128, layers=3)


def _direct(model, batches, names, weights):
    """KL (mean over positions) and perplexity of the full HF model with ``names`` given ``weights``."""
    quantized = copy.deepcopy(model)
    for name, weight in zip(names, weights):  # a new Parameter: the tied LM head changes alone
        quantized.get_submodule(name).weight = torch.nn.Parameter(weight)
    kl, nll, rows, scored = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for batch in batches:
            p = torch.log_softmax(model(batch).logits.float(), -1)
            q = torch.log_softmax(quantized(batch).logits.float(), -1)
            kl += float(torch.nn.functional.kl_div(q, p, log_target=True, reduction="sum"))
            rows += batch.numel()
            nll += float(torch.nn.functional.cross_entropy(q[:, :-1].reshape(-1, q.shape[-1]), batch[:, 1:].reshape(-1),
                                                           reduction="sum"))
            scored += batch[:, 1:].numel()
    return kl / rows, math.exp(nll / scored)


def test_each_op_matches_a_direct_full_forward(model, batches):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = analyze_sensitivity(model, batches, SCHEME, method="rtn")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # model left unchanged
    assert len(report.ops) == 3 * 4 + 1 and report.ops[-1].ref == OpRef(None, "lm_head")
    _, base_ppl = _direct(model, batches, [], [])
    assert report.base_ppl == pytest.approx(base_ppl, rel=1e-5)
    for entry in report.ops:
        names = entry.ref.linear_names()
        weights = [fake_quantize(model.get_submodule(n).weight, SCHEME) for n in names]
        kl, ppl = _direct(model, batches, names, weights)
        assert entry.kl == pytest.approx(kl, rel=1e-3, abs=1e-7), entry.ref
        assert entry.dppl == pytest.approx(100 * (ppl / base_ppl - 1), rel=1e-3, abs=1e-4), entry.ref
        assert entry.kl > 0


def test_gptq_hurts_less_than_rtn_overall(model, batches):
    rtn = analyze_sensitivity(model, batches, SCHEME, method="rtn")
    gptq = analyze_sensitivity(model, batches, SCHEME, method="gptq")
    assert sum(op.kl for op in gptq.ops) < sum(op.kl for op in rtn.ops)


def test_flags_follow_thresholds_and_report_round_trips(model, batches, tmp_path):
    report = analyze_sensitivity(model, batches, SCHEME, method="rtn", thresholds=Thresholds(kl=0.0, dispersion=1e9,
                                                                                              energy=1.0))
    assert report.flagged() == [op.ref for op in report.ops]  # every KL > 0
    strict = analyze_sensitivity(model, batches, SCHEME, thresholds=Thresholds(kl=1e9, dispersion=1e9, energy=1.0))
    assert strict.flagged() == [] and {op.flag for op in strict.ops} == {"int4"}
    path = tmp_path / "report.json"
    report.save(path)
    loaded = SensitivityReport.load(path)
    assert loaded.ops == report.ops and loaded.scheme == SCHEME
    assert loaded.ranking("kl")[0] == max(report.ops, key=lambda op: op.kl).ref
    plot_report(report, tmp_path / "report.png")
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_awq_quantizer_never_worse_than_rtn_on_block_output(model, batches):
    """AWQ searches scales whose grid includes s = 1 (RTN), so the op's own output error cannot grow."""
    layer = model.model.layers[0]
    x = torch.randn(64, 64)
    linears = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]
    with torch.no_grad():
        rtn = make_quantizer("rtn", SCHEME)("qkv_proj", linears, x, layer)
        awq = make_quantizer("awq", SCHEME)("qkv_proj", linears, x, layer)
    err = lambda ws: sum(float((x @ (w - lin.weight.detach()).T).pow(2).mean()) for w, lin in zip(ws, linears))  # noqa: E731
    assert err(awq) <= err(rtn) * (1 + 1e-6)
    with pytest.raises(ValueError, match="method"):
        make_quantizer("smoothquant", SCHEME)
