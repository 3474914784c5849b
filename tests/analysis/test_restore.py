"""Leave-one-out (restore) gains on a tiny random Llama: each op's gain equals the perplexity of a model
built independently — every decoder linear quantized by ``quantize_model`` (RTN, or GPTQ in order),
then that op's float weights put back — run by Hugging Face."""
import copy
import math

import pytest
import torch

from ember.analysis.report import SensitivityReport
from ember.analysis.restore import with_restore_gains
from ember.analysis.sensitivity import analyze_sensitivity
from ember.kernels.linear.spec import WeightScheme
from ember.quant import QuantConfig, quantize_model
from ember.quant.plan import OpRef, decoder_ops, op_shapes, op_weight_bytes

from quant_models import make_tiny_llama

SCHEME = WeightScheme(4, 32, True)
NUM_LAYERS = 3


@pytest.fixture(scope="module")
def setup():
    model = make_tiny_llama(hidden=64, intermediate=128, layers=NUM_LAYERS)
    torch.manual_seed(2)  # text the model itself samples: quantization raises its perplexity on average
    with torch.no_grad():
        batches = [model.generate(torch.randint(0, 256, (2, 1)), do_sample=True, max_new_tokens=23, min_new_tokens=23,
                                  pad_token_id=0) for _ in range(3)]
    return model, batches


def _hf_ppl(model, batches) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logits = model(batch).logits[:, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                           batch[:, 1:].reshape(-1), reduction="sum"))
            count += batch[:, 1:].numel()
    return math.exp(nll / count)


def _quantized_weights(model, batches, method: str) -> dict[str, torch.Tensor]:
    """Every decoder linear's dequantized weight after the checkpoint pipeline (``quantize_model``)."""
    reference = copy.deepcopy(model)
    quantize_model(reference, QuantConfig(method=method, bits=4, group_size=32), calib_batches=batches)
    names = [n for ref in decoder_ops(NUM_LAYERS) for n in ref.linear_names()]
    return {name: reference.get_submodule(name).dequantize() for name in names}


def _ppl_with(model, batches, weights: dict[str, torch.Tensor], restored: OpRef | None) -> float:
    """Perplexity of ``model`` given ``weights``, except the linears of ``restored`` (left float)."""
    built = copy.deepcopy(model)
    keep = set(restored.linear_names()) if restored else set()
    for name, weight in weights.items():
        if name not in keep:
            built.get_submodule(name).weight.data = weight.clone()
    return _hf_ppl(built, batches)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_each_gain_matches_an_independently_built_model(setup, method):
    model, batches = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = analyze_sensitivity(model, batches, SCHEME, method=method, restore=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # model left unchanged
    weights = _quantized_weights(model, batches, method)
    base = _hf_ppl(model, batches)
    quantized = _ppl_with(model, batches, weights, None)
    assert report.base_ppl == pytest.approx(base, rel=1e-5)
    assert report.quantized_ppl == pytest.approx(quantized, rel=1e-4)
    assert quantized > base * 1.001  # there is something to win back
    for entry in report.ops:
        if entry.ref.layer is None:
            assert entry.restore_gain == 0.0  # lm_head is never quantized with the decoder
            continue
        restored = _ppl_with(model, batches, weights, entry.ref)
        expected = 100 * (quantized - restored) / base
        assert entry.restore_gain == pytest.approx(expected, rel=1e-3, abs=1e-3), entry.ref
    gains = [op.restore_gain for op in report.ops if op.ref.layer is not None]
    assert max(gains) > 0.1  # some op matters, so the check above is not comparing zeros


def test_restore_rankings_and_round_trip(setup, tmp_path):
    model, batches = setup
    plain = analyze_sensitivity(model, batches, SCHEME, method="rtn")
    with pytest.raises(ValueError, match="restore"):
        plain.ranking("restore_per_byte")
    report = with_restore_gains(plain, model, batches)
    shapes = op_shapes(model, [op.ref for op in report.ops])
    for op in report.ops:
        assert op.num_weights == op_weight_bytes(shapes[op.ref], "bf16") // 2
    by_gain = report.ranking("restore")
    per_byte = report.ranking("restore_per_byte")
    gain = {op.ref: op.restore_gain for op in report.ops}
    assert [gain[r] for r in by_gain] == sorted(gain.values(), reverse=True)
    density = [gain[r] / report.ops[[o.ref for o in report.ops].index(r)].num_weights for r in per_byte]
    assert density == sorted(density, reverse=True)
    assert by_gain != per_byte  # gate_up is 2x the size of down_proj: ranking per byte reorders
    path = tmp_path / "report.json"
    report.save(path)
    loaded = SensitivityReport.load(path)
    assert loaded.ops == report.ops and loaded.quantized_ppl == report.quantized_ppl
    assert "restore_gain" in loaded.rank_correlations()
