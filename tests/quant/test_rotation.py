"""Hadamard constructions and QuaRot-style rotation: float outputs unchanged, outliers spread."""
import pytest
import torch

from ember.quant.hadamard import hadamard_matrix, has_hadamard, random_hadamard
from ember.quant.rotation import fold_norm_weights, rotate_model

from quant_models import make_tiny_llama


@pytest.mark.parametrize("order", [2, 12, 20, 64, 96, 128, 576, 1536])
def test_hadamard_orders(order):
    h = hadamard_matrix(order)
    assert torch.all(h.abs() == 1)
    torch.testing.assert_close(h @ h.T, order * torch.eye(order, dtype=torch.float64), rtol=0, atol=0)


def test_random_hadamard_orthogonal_and_fallback():
    q = random_hadamard(576, seed=3)
    torch.testing.assert_close(q @ q.T, torch.eye(576, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.allclose(q.abs(), torch.full_like(q, 576 ** -0.5))
    assert not has_hadamard(6)  # no Hadamard matrix of order 6 exists: QR-based orthogonal fallback
    q6 = random_hadamard(6)
    torch.testing.assert_close(q6 @ q6.T, torch.eye(6, dtype=torch.float64))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("hidden, heads, kv_heads, tied", [
    (128, 4, 2, True),   # GQA, tied embeddings (must be untied)
    (96, 4, 4, False),   # Paley-based order 96, head_dim 24 = Paley 12 x 2
])
def test_rotation_preserves_outputs(hidden, heads, kv_heads, tied):
    model = make_tiny_llama(hidden=hidden, heads=heads, kv_heads=kv_heads, intermediate=2 * hidden, tied=tied)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    before = _logits(model, ids)
    rotate_model(model, seed=5)
    after = _logits(model, ids)
    assert (after - before).abs().max() < 1e-4
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert torch.all(model.model.layers[0].input_layernorm.weight == 1)


def test_fold_norms_alone_preserves_outputs():
    model = make_tiny_llama(tied=False)
    ids = torch.randint(0, 256, (1, 16))
    before = _logits(model, ids)
    fold_norm_weights(model)
    assert (_logits(model, ids) - before).abs().max() < 1e-4


def test_rotation_spreads_weight_outliers():
    model = make_tiny_llama(tied=False)
    fold_norm_weights(model)  # norm gains with outliers become outlier weight columns
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    kurtosis = lambda w: float((w ** 4).mean() / (w ** 2).mean() ** 2)
    folded = kurtosis(q_proj.detach().clone())
    rotate_model(model)
    assert kurtosis(model.model.layers[0].self_attn.q_proj.weight.detach()) < folded / 2
