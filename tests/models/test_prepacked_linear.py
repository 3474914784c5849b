"""oneDNN-prepacked bfloat16 linears against the plain bfloat16 and float32 paths."""

import pytest
import torch
from torch import nn

from ember.models.layers.linear import PrepackedLinear, can_prepack, prepack_linears

pytestmark = pytest.mark.skipif(not can_prepack(torch.bfloat16), reason="no oneDNN bfloat16 support")


@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_prepacked_linear_matches_float32(rows):
    torch.manual_seed(0)
    linear = nn.Linear(576, 1536, bias=False).to(torch.bfloat16)
    x = torch.randn(rows, 576).to(torch.bfloat16)
    expected = x.float() @ linear.weight.float().T  # exact products of the bf16 inputs
    out = PrepackedLinear(linear)(x)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 1536)
    # bfloat16 output rounding only: relative error of the stored result <= 2^-8 (+ accumulation).
    torch.testing.assert_close(out.float(), expected, rtol=2 ** -7, atol=1e-2)


def test_prepack_replaces_every_bias_free_linear():
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Sequential(nn.Linear(8, 4, bias=False)),
                          nn.Linear(4, 2, bias=True)).to(torch.bfloat16)
    assert prepack_linears(model) == 2
    assert isinstance(model[0], PrepackedLinear) and isinstance(model[1][0], PrepackedLinear)
    assert type(model[2]) is nn.Linear
