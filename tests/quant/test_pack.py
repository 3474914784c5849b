"""Bit packing and RTN quantization: exact round trips, SQNR floors, group-size validation."""
import pytest
import torch

from ember.kernels.linear.pack import pack_int4, pack_int8, unpack_int4, unpack_int8
from ember.quant.rtn import WeightScheme, fake_quantize, quantize_weight, sqnr_db


def test_int4_round_trip_exact():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (37, 64), generator=gen, dtype=torch.uint8)
    codes[0, :16] = torch.arange(16, dtype=torch.uint8)  # every code value
    packed = pack_int4(codes)
    assert packed.shape == (37, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    assert packed[0, 0] == 0x10  # column 0 low nibble, column 1 high nibble


def test_int8_round_trip_exact():
    codes = torch.arange(-128, 128, dtype=torch.int16).view(4, 64)
    assert torch.equal(unpack_int8(pack_int8(codes)).to(torch.int16), codes)


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError):
        pack_int4(torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(ValueError):
        pack_int4(torch.full((2, 4), 16))
    with pytest.raises(ValueError):
        pack_int8(torch.full((2, 4), 200))


@pytest.mark.parametrize("scheme, floor_db", [
    (WeightScheme(8), 42.0),
    (WeightScheme(4, 32, True), 19.8), (WeightScheme(4, 64, True), 19.0), (WeightScheme(4, 128, True), 18.2),
    (WeightScheme(4, 32, False), 21.4), (WeightScheme(4, 64, False), 20.4), (WeightScheme(4, 128, False), 19.5),
])
def test_rtn_sqnr_floor(scheme, floor_db):
    # Gaussian weights: measured 42.8 / 20.3, 19.3, 18.6 / 21.8, 20.8, 19.9 dB
    weight = torch.randn(256, 384, generator=torch.Generator().manual_seed(0))
    quantized = quantize_weight(weight, scheme)
    assert sqnr_db(weight, quantized.dequantize()) > floor_db
    assert torch.equal(quantized.dequantize(), fake_quantize(weight, scheme))
    codes = quantized.codes()
    assert int(codes.min()) >= scheme.qmin and int(codes.max()) <= scheme.qmax


def test_rtn_layouts():
    weight = torch.randn(8, 128)
    sym = quantize_weight(weight, WeightScheme(4, 64, True))
    assert sym.qweight.shape == (8, 64) and sym.scales.shape == (8, 2) and sym.offsets is None
    asym = quantize_weight(weight, WeightScheme(4, 32, False))
    assert asym.offsets.shape == (8, 4) and asym.offsets.dtype == torch.float32
    int8 = quantize_weight(weight, WeightScheme(8))
    assert int8.qweight.dtype == torch.int8 and int8.scales.shape == (8, 1)


def test_asymmetric_reproduces_q4_1_grid():
    # GGUF Q4_1: w = q * d + m per block of 32, q in [0, 15]; the extremes are attained by construction
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (16, 4, 32), generator=gen).float()
    q[..., 0], q[..., 1] = 0, 15
    d = torch.rand(16, 4, 1, generator=gen) * 0.01 + 1e-3
    m = -torch.rand(16, 4, 1, generator=gen) * 0.1
    weight = (q * d + m).view(16, 128)
    deq = quantize_weight(weight, WeightScheme(4, 32, False)).dequantize()
    torch.testing.assert_close(deq, weight, rtol=0, atol=1e-6)


def test_constant_and_zero_rows_are_exact():
    weight = torch.randn(4, 64)
    weight[1] = 0.0
    weight[2] = 0.25
    for scheme in (WeightScheme(4, 32, False), WeightScheme(4, 32, True), WeightScheme(8)):
        deq = quantize_weight(weight, scheme).dequantize()
        assert torch.all(deq[1] == 0)
    assert torch.all(quantize_weight(weight, WeightScheme(4, 32, False)).dequantize()[2] == 0.25)


def test_group_size_must_divide_in_features():
    with pytest.raises(ValueError, match="does not divide"):
        quantize_weight(torch.randn(4, 576), WeightScheme(4, 128, True))
    assert quantize_weight(torch.randn(4, 576), WeightScheme(4, 64, True)).scales.shape == (4, 9)
