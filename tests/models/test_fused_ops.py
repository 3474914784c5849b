"""Native fused bfloat16 ops against the PyTorch layers they replace (same rounding steps)."""

import pytest
import torch

from ember.kernels.ops import core_ops
from ember.models.layers.norm import RMSNorm
from ember.models.layers.rotary import RotaryEmbedding, apply_rotary

ops = core_ops()
pytestmark = pytest.mark.skipif(ops is None, reason="no native build: the PyTorch path is in use")
BF16 = torch.bfloat16


def test_rms_norm_matches_reference_layer():
    torch.manual_seed(0)
    norm = RMSNorm(576, eps=1e-5).to(BF16)
    norm.weight.data = torch.randn(576).to(BF16)
    x = (torch.randn(37, 576) * 3).to(BF16)
    expected = norm.reference_forward(x)
    out = ops.rms_norm_bf16(x, norm.weight, 1e-5)
    # float32 sums in another order can move a value across a bf16 rounding boundary: 1 ulp at most
    torch.testing.assert_close(out.float(), expected.float(), rtol=2 ** -7, atol=1e-6)
    assert (out != expected).float().mean() < 0.01


def test_rope_matches_reference():
    torch.manual_seed(1)
    rotary = RotaryEmbedding(64, 2048, 100000.0)
    positions = torch.randint(0, 2048, (23,))
    rope = rotary(positions, BF16)
    q = torch.randn(23, 9, 64).to(BF16)
    k = torch.randn(23, 3, 64).to(BF16)
    eq, ek = apply_rotary(q, k, rope)
    q2, k2 = q.clone(), k.clone()
    ops.rope_bf16_(q2, *rope)
    ops.rope_bf16_(k2, *rope)
    assert torch.equal(q2, eq) and torch.equal(k2, ek)


def test_silu_mul_matches_reference():
    torch.manual_seed(2)
    gate_up = (torch.randn(11, 2 * 1536) * 4).to(BF16)
    gate, up = gate_up.chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    out = ops.silu_mul_bf16(gate_up)
    # expf's last bit can move silu(gate) by one bf16 ulp, which the product with `up` can make
    # two ulps of the output; anything more is a bug.
    torch.testing.assert_close(out.float(), expected.float(), rtol=2 ** -6, atol=1e-6)
    assert (out != expected).float().mean() < 0.01
