"""quantize_tensor on the tutorial's worked tensor and on degenerate inputs."""

from __future__ import annotations

import math

import pytest
import torch

import workbench as wb

SEED_TENSOR = torch.tensor([-0.5, -0.2, 0.0, 0.3, 0.6])


def test_seed_symmetric_int8():
    qt = wb.quantize_tensor(SEED_TENSOR, wb.Scheme(8, symmetric=True))
    assert qt.scale.shape == ()
    assert float(qt.scale) == pytest.approx(0.6 / 127, rel=1e-6)
    assert int(qt.zero_point) == 0
    # round(x * 127 / 0.6): -105.83 -> -106, -42.33 -> -42, 0, 63.5 -> 64 (half to even), 127
    assert qt.q.tolist() == [-106, -42, 0, 64, 127]
    expected = torch.tensor([-106, -42, 0, 64, 127], dtype=torch.float32) * (0.6 / 127)
    torch.testing.assert_close(qt.dequantize(), expected, rtol=1e-6, atol=1e-7)


def test_seed_asymmetric_uint8():
    qt = wb.quantize_tensor(SEED_TENSOR, wb.Scheme(8, symmetric=False))
    scale = 1.1 / 255
    assert float(qt.scale) == pytest.approx(scale, rel=1e-6)
    # round(0.5 / scale) = round(115.9) = 116 (the tutorial prints 106 by mistake)
    assert int(qt.zero_point) == 116
    codes = [round(v / scale) + 116 for v in (-0.5, -0.2, 0.0, 0.3, 0.6)]
    assert qt.q.tolist() == [max(0, min(255, c)) for c in codes] == [0, 70, 116, 186, 255]
    expected = (torch.tensor(codes, dtype=torch.float32) - 116) * scale
    torch.testing.assert_close(qt.dequantize(), expected, rtol=1e-6, atol=1e-7)
    assert float(qt.dequantize()[2]) == 0.0


def test_seed_per_channel_is_per_row():
    x = torch.stack([SEED_TENSOR, 2 * SEED_TENSOR])
    qt = wb.quantize_tensor(x, wb.Scheme(8, symmetric=True, per_channel=True, axis=0))
    torch.testing.assert_close(qt.scale, torch.tensor([0.6 / 127, 1.2 / 127]))
    assert torch.equal(qt.q[0], qt.q[1])


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("per_channel", [True, False])
def test_all_zero_tensor(symmetric, per_channel):
    x = torch.zeros(3, 4)
    qt = wb.quantize_tensor(x, wb.Scheme(8, symmetric=symmetric, per_channel=per_channel))
    assert bool(torch.isfinite(qt.scale).all()) and bool((qt.scale > 0).all())
    assert bool(torch.isfinite(qt.dequantize()).all())
    assert torch.equal(qt.dequantize(), x)
    assert bool((qt.zero_point == 0).all())


@pytest.mark.parametrize("value", [3.0, -3.0, 1e-30, 0.0])
@pytest.mark.parametrize("symmetric", [True, False])
def test_single_value(value, symmetric):
    for x in (torch.tensor(value), torch.tensor([value])):
        qt = wb.quantize_tensor(x, wb.Scheme(8, symmetric=symmetric))
        deq = qt.dequantize()
        assert deq.shape == x.shape
        assert bool(torch.isfinite(qt.scale)) and float(qt.scale) > 0
        # one value is an end of the range, so it is represented (almost) exactly
        assert float(deq.reshape(-1)[0]) == pytest.approx(value, rel=1e-6, abs=1e-7)


def test_single_value_per_channel():
    qt = wb.quantize_tensor(torch.tensor([2.0]), wb.Scheme(4, per_channel=True))
    assert qt.scale.shape == (1,)
    assert float(qt.dequantize()[0]) == pytest.approx(2.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_raises_naming_the_tensor(bad):
    x = torch.tensor([0.1, bad, 0.3])
    with pytest.raises(wb.NonFiniteError, match=r"fc1\.weight"):
        wb.quantize_tensor(x, wb.Scheme(8), name="fc1.weight")
    with pytest.raises(wb.NonFiniteError, match="1 NaN/Inf"):
        wb.quantize_tensor(x, wb.Scheme(8, symmetric=False, per_channel=True))


def test_empty_tensor_is_a_config_error():
    with pytest.raises(wb.ConfigError, match="empty"):
        wb.quantize_tensor(torch.zeros(0), wb.Scheme(8))


@pytest.mark.parametrize("bits", [1, 9, 16, 8.0, True])
def test_scheme_rejects_bad_bits(bits):
    with pytest.raises(wb.ConfigError):
        wb.Scheme(bits=bits)


@pytest.mark.parametrize(
    "scheme,quant_min,quant_max",
    [
        (wb.Scheme(8, True), -128, 127),
        (wb.Scheme(8, True, narrow_range=True), -127, 127),
        (wb.Scheme(8, False), 0, 255),
        (wb.Scheme(8, False, narrow_range=True), 0, 254),
        (wb.Scheme(4, True), -8, 7),
        (wb.Scheme(2, False), 0, 3),
    ],
)
def test_scheme_integer_ranges(scheme, quant_min, quant_max):
    assert (scheme.quant_min, scheme.quant_max) == (quant_min, quant_max)
    assert scheme.levels == quant_max - quant_min + 1


def test_scheme_is_frozen_and_hashable():
    s = wb.Scheme(8, True, True, 0)
    assert hash(s) == hash(wb.Scheme(8, True, True, 0))
    assert {s: 1}[wb.Scheme(8, True, True, 0)] == 1
    with pytest.raises(AttributeError):
        s.bits = 4  # type: ignore[misc]


def test_packed_storage_bytes_of_qtensor():
    qt = wb.quantize_tensor(torch.randn(5, 10), wb.Scheme(4, symmetric=False, per_channel=True))
    assert qt.storage_bytes == math.ceil(50 * 4 / 8) + 4 * 5 + 5


@pytest.mark.parametrize("axis", [2, -3, 5])
def test_per_channel_axis_out_of_range(axis):
    with pytest.raises(wb.ConfigError, match="out of range for a 2-D tensor"):
        wb.quantize_tensor(torch.randn(3, 4), wb.Scheme(8, per_channel=True, axis=axis))


def test_per_channel_negative_axis_is_the_last_dimension():
    x = torch.randn(3, 4)
    last = wb.quantize_tensor(x, wb.Scheme(8, per_channel=True, axis=-1))
    one = wb.quantize_tensor(x, wb.Scheme(8, per_channel=True, axis=1))
    assert torch.equal(last.scale, one.scale) and torch.equal(last.q, one.q)
    assert last.scale.shape == (4,)
