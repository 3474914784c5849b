"""Numerics of GPTQ, AWQ and SmoothQuant on single layers, and of every method on a tiny Llama."""
import pytest
import torch
from torch import nn

from ember.quant.api import quantize_model
from ember.quant.awq import apply_clip, awq_search_clip, awq_search_scales
from ember.quant.config import QuantConfig
from ember.quant.gptq import HessianAccumulator, gptq_quantize
from ember.kernels.linear.reference import quantize_per_token
from ember.quant.linear import QuantLinear
from ember.quant.rtn import CLIP_SHRINKS, WeightScheme, fake_quantize, quantize_weight, sqnr_db, weighted_qparams
from ember.quant.smoothquant import smoothing_scales

from quant_models import make_tiny_llama

SCHEMES = [WeightScheme(8), WeightScheme(4, 64, True), WeightScheme(4, 32, False)]
# absolute output-SQNR floors (dB) on the synthetic outlier layers below; measured in comments
GPTQ_FLOOR = {SCHEMES[0]: 55.0, SCHEMES[1]: 33.0, SCHEMES[2]: 35.0}  # 60.5 / 36.7 / 39.0
AWQ_FLOOR = {SCHEMES[0]: 45.0, SCHEMES[1]: 21.5, SCHEMES[2]: 23.0}  # 46.2 / 22.4 / 24.0


def _outlier_inputs(tokens=1024, channels=256, correlated=False):
    gen = torch.Generator().manual_seed(0)
    if correlated:  # activations of real models live near a low-rank subspace
        x = torch.randn(tokens, 32, generator=gen) @ torch.randn(32, channels, generator=gen)
        x = x + 0.1 * torch.randn(tokens, channels, generator=gen)
    else:
        x = torch.randn(tokens, channels, generator=gen)
    x[:, :8] *= 15.0  # outlier channels
    weight = torch.randn(128, channels, generator=gen) * 0.05
    return x, weight


def test_hessian_accumulator_streams():
    x, _ = _outlier_inputs(tokens=300)
    acc = HessianAccumulator()
    first, rest = x[:100], x[100:]
    for part in (first, rest):
        acc("l", part)
        acc("shared", part.detach())  # same input seen by another linear (q/k/v)
    expected = 2 * x.double().T @ x.double() / 300
    torch.testing.assert_close(acc.hessians["l"], expected, rtol=1e-5, atol=1e-4)  # float32 products
    assert torch.equal(acc.hessians["shared"], acc.hessians["l"]) and acc.num_tokens["shared"] == 300


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn(scheme, act_order):
    x, weight = _outlier_inputs(correlated=True)
    acc = HessianAccumulator()
    acc("l", x)
    quantized = gptq_quantize(weight, acc.hessians["l"], scheme, act_order=act_order, block_size=64)
    reference = x @ weight.T
    rtn = sqnr_db(reference, x @ fake_quantize(weight, scheme).T)
    gptq = sqnr_db(reference, x @ quantized.dequantize().T)
    assert gptq > rtn + 10.0 and gptq > GPTQ_FLOOR[scheme]  # measured +15..+19 dB over RTN


@pytest.mark.parametrize("scheme", SCHEMES[1:])
def test_weighted_clip_search_reaches_the_best_shrink(scheme):
    # every (row, group) against a brute force over the same shrink factors, written from the 4-bit grids:
    # symmetric codes -8..7 times max|w| p / 7; asymmetric 0..15 from p min(w) in steps of p (max - min) / 15
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(6, 128, generator=gen) ** 3  # heavy tails, where clipping pays
    weights = torch.rand(128, generator=gen) * 4
    scales, offsets = weighted_qparams(w, scheme, weights)
    size = scheme.group_size
    deq = (torch.clamp(torch.round((w.view(6, -1, size) - offsets[..., None]) / scales[..., None]), 0, 15)
           * scales[..., None] + offsets[..., None])
    chosen = ((deq - w.view(6, -1, size)) ** 2 * weights.view(1, -1, size)).sum(-1)
    shrunk = 0
    for row in range(6):
        for group in range(128 // size):
            part, c = w[row, group * size:(group + 1) * size], weights[group * size:(group + 1) * size]
            errors = []
            for p in CLIP_SHRINKS:
                if scheme.symmetric:
                    step = p * part.abs().max() / 7
                    grid = torch.clamp(torch.round(part / step), -8, 7) * step
                else:
                    lo, step = p * part.min(), p * (part.max() - part.min()) / 15
                    grid = torch.clamp(torch.round((part - lo) / step), 0, 15) * step + lo
                errors.append(float((c * (part - grid) ** 2).sum()))
            assert chosen[row, group] <= min(errors) * (1 + 1e-5) + 1e-9
            shrunk += min(errors) < errors[0]
    assert shrunk > 0  # the search moved some groups off their full range


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_clip_search_takes_the_weighted_scales_of_its_groups(act_order):
    # with a diagonal Hessian no column's error reaches another, so GPTQ is RTN on its group scales: those of
    # the weighted search over each group's weights (computed when the group starts without act-order)
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(32, 256, generator=gen) ** 3
    diagonal = torch.rand(256, generator=gen) + 0.1
    scheme = SCHEMES[1]
    quantized = gptq_quantize(weight, torch.diag(diagonal).double(), scheme, act_order=act_order, block_size=64,
                              clip_search=True)
    scales, _ = weighted_qparams(weight, scheme, diagonal)
    torch.testing.assert_close(quantized.scales, scales)
    plain = gptq_quantize(weight, torch.diag(diagonal).double(), scheme, act_order=act_order, block_size=64)
    assert not torch.equal(plain.scales, quantized.scales)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_awq_beats_rtn(scheme):
    x, weight = _outlier_inputs()
    linear = nn.Linear(256, 128, bias=False)
    linear.weight.data = weight.clone()
    result = awq_search_scales(x, [linear], scheme, n_grid=10)
    reference = x @ weight.T
    rtn = sqnr_db(reference, x @ fake_quantize(weight, scheme).T)
    awq = sqnr_db(reference, (x / result.scales) @ fake_quantize(weight * result.scales, scheme).T)
    assert 0.0 < result.alpha <= 1.0 and result.loss < result.rtn_loss
    assert awq > rtn + 1.5 and awq > AWQ_FLOOR[scheme]  # measured +1.9 (asym g32) .. +2.9 dB
    assert torch.equal(linear.weight, weight)  # the search leaves the layer as it was


def test_smoothquant_beats_plain_w8a8():
    x, weight = _outlier_inputs()

    def w8a8(inputs, w):
        codes, x_scale = quantize_per_token(inputs)
        q = quantize_weight(w, WeightScheme(8))
        return (codes.float() @ q.codes().float().T) * x_scale * q.scales.view(1, -1)

    linear = nn.Linear(256, 128, bias=False)
    linear.weight.data = weight
    scales = smoothing_scales(x.abs().amax(dim=0), [linear], alpha=0.5)
    reference = x @ weight.T
    plain = sqnr_db(reference, w8a8(x, weight))
    smooth = sqnr_db(reference, w8a8(x / scales, weight * scales))
    assert plain > 30.0 and smooth > 38.0  # measured 32.7 -> 40.4 dB


# (config, logits SQNR floor in dB on the tiny Llama; measured values in comments)
MODEL_CASES = [
    (dict(method="rtn", bits=8), 32.0),  # 35.0
    (dict(method="rtn", bits=4, group_size=64), 9.0),  # 10.8
    (dict(method="rtn", bits=4, group_size=32, symmetric=False), 10.0),
    (dict(method="awq", bits=4, group_size=64, method_args={"n_grid": 5}), 11.0),  # 13.4 (n_grid 20)
    (dict(method="gptq", bits=4, group_size=64, method_args={"act_order": False}), 13.0),  # 15.7
    (dict(method="gptq", bits=4, group_size=64, method_args={"act_order": True}), 13.0),  # 14.8
    # 15.4; the same GPTQ without the search scores 13.6 on this data
    (dict(method="gptq", bits=4, group_size=64, method_args={"clip_search": True}), 14.5),
    (dict(method="rtn", bits=8, act_bits=8), 20.0),  # 23.2
    (dict(method="smoothquant", bits=8, act_bits=8), 24.0),  # 26.4
    (dict(method="gptq", bits=4, group_size=64, act_bits=8, method_args={"act_order": True}), 11.0),  # 12.7 (W4A8)
    (dict(method="rtn", bits=4, group_size=64, rotate=True), 9.0),
]


@pytest.fixture(scope="module")
def float_logits():
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return ids, make_tiny_llama()(ids).logits


@pytest.mark.parametrize("kwargs, floor_db", MODEL_CASES)
def test_quantize_tiny_llama(kwargs, floor_db, float_logits, calib_batches):
    ids, reference = float_logits
    model = make_tiny_llama()
    names = quantize_model(model, QuantConfig(**kwargs), calib_batches=calib_batches)
    assert len(names) == 14 and all(isinstance(model.get_submodule(n), QuantLinear) for n in names)
    with torch.no_grad():
        logits = model(ids).logits
    assert sqnr_db(reference, logits) > floor_db


def test_calibrated_methods_beat_rtn_on_tiny_llama(float_logits, calib_batches):
    ids, reference = float_logits
    scores = {}
    for method in ("rtn", "gptq", "awq"):
        model = make_tiny_llama()
        quantize_model(model, method=method, bits=4, group_size=64, calib_batches=calib_batches,
                       method_args={"n_grid": 5} if method == "awq" else {})
        with torch.no_grad():
            scores[method] = sqnr_db(reference, model(ids).logits)
    assert scores["gptq"] > scores["rtn"] + 2.0 and scores["awq"] > scores["rtn"] + 1.0


def test_config_validation():
    with pytest.raises(ValueError):
        QuantConfig(bits=4)  # no group size
    with pytest.raises(ValueError):
        QuantConfig(bits=4, group_size=48)
    with pytest.raises(ValueError):
        QuantConfig(method="smoothquant", bits=8)  # W8A8 needs act_bits=8
    with pytest.raises(ValueError):
        quantize_model(make_tiny_llama(), method="gptq", bits=8)  # no calibration data
    with pytest.raises(ValueError, match="clip_search"):
        QuantConfig(method="rtn", bits=4, group_size=64, method_args={"clip_search": True})
    with pytest.raises(ValueError, match="clip_search"):
        QuantConfig(method="gptq", bits=8, method_args={"clip_search": True})
    with pytest.raises(ValueError, match="does not divide"):
        quantize_model(make_tiny_llama(hidden=96, intermediate=192), method="rtn", bits=4, group_size=64)


@pytest.mark.parametrize("scheme, min_gain_db", [(SCHEMES[1], 0.3), (SCHEMES[2], 0.05)])
def test_awq_clip_reduces_output_error(scheme, min_gain_db):
    # Gaussian weights: clipping gains measured +0.57 dB (sym g64) and +0.15 dB (asym g32)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(512, 256, generator=gen)
    weight = torch.randn(64, 256, generator=gen) * 0.05
    max_abs = awq_search_clip(x, weight, scheme, n_grid=10)
    group = scheme.group_len(256)
    assert torch.all(max_abs <= weight.abs().view(64, -1, group).amax(-1) + 1e-7)
    clipped = weight.clone()
    apply_clip(clipped, max_abs)
    reference = x @ weight.T
    rtn = sqnr_db(reference, x @ fake_quantize(weight, scheme).T)
    assert sqnr_db(reference, x @ fake_quantize(clipped, scheme).T) > rtn + min_gain_db
