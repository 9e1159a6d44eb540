"""GPTQ: its codes lie on the layer's grid, it lowers the layer's output error on correlated
inputs below round-to-nearest's, it matches an independent (explicit-inverse, one column at a
time) formulation, act-order's permutation is undone, and wb.ptq wires it layer by layer."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import workbench as wb
from workbench.engine.algorithms.gptq_layers import (
    GPTQWeightQuantizer,
    from_matrix,
    input_rows,
    weight_matrix,
)
from workbench.engine.algorithms.gptq_solver import expand_groups, gptq_quantize, row_qparams
from workbench.engine.placement.layers import iter_quantized_layers
from workbench.errors import ConfigError


def _correlated_inputs(samples: int, columns: int, seed: int) -> torch.Tensor:
    """Inputs whose features are mixed (correlated) and of uneven energy, as in real layers."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(columns, columns, generator=generator) / columns**0.5
    energy = torch.exp(torch.randn(columns, generator=generator))
    return (torch.randn(samples, columns, generator=generator) @ mixing) * energy


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return 2.0 * x.t() @ x / x.shape[0]


def _nearest(weight, scale, zero_point, scheme, group_size=None):
    scale, zero_point = expand_groups(scale, zero_point, weight.shape[1], group_size)
    codes = torch.round(weight / scale) + zero_point
    codes = torch.clamp(codes, scheme.quant_min, scheme.quant_max)
    return (codes - zero_point) * scale


def _output_error(x: torch.Tensor, weight: torch.Tensor, quantized: torch.Tensor) -> float:
    return float((x @ (weight - quantized).t()).norm())


def _reference_gptq(weight, hessian, scheme, scale, zero_point, damp_fraction=0.01):
    """GPTQ as Optimal Brain Quantization states it, in float64: quantize column q, spread
    its error over the remaining columns F with ``-(w_q - Q(w_q)) / [H_F^-1]_qq * (H_F^-1)_:,q``,
    then remove q from ``H_F^-1`` by Gaussian elimination. No Cholesky, no blocks."""
    w = weight.to(torch.float64).clone()
    h = hessian.to(torch.float64).clone()
    h += damp_fraction * torch.mean(torch.diagonal(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    h_inv = torch.linalg.inv(h)
    s, z = scale.to(torch.float64).reshape(-1), zero_point.to(torch.float64).reshape(-1)
    codes = torch.zeros_like(w)
    for q in range(w.shape[1]):
        c = torch.clamp(torch.round(w[:, q] / s) + z, scheme.quant_min, scheme.quant_max)
        codes[:, q] = c
        error = (w[:, q] - (c - z) * s) / h_inv[q, q]
        w[:, q:] -= error.unsqueeze(1) * h_inv[q, q:].unsqueeze(0)
        h_inv = h_inv - torch.outer(h_inv[:, q], h_inv[q, :]) / h_inv[q, q]
    return codes


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_output_error_is_below_round_to_nearest(bits, symmetric):
    x = _correlated_inputs(2048, 96, seed=bits)
    weight = torch.randn(48, 96, generator=torch.Generator().manual_seed(7))
    scheme = wb.Scheme(bits, symmetric, True, 0)
    scale, zero_point = row_qparams(weight, scheme)
    result = gptq_quantize(weight, _hessian(x), scheme, scale, zero_point)
    nearest = _output_error(x, weight, _nearest(weight, scale, zero_point, scheme))
    assert _output_error(x, weight, result.dequantize()) < 0.9 * nearest
    ordered = gptq_quantize(weight, _hessian(x), scheme, scale, zero_point, act_order=True)
    assert _output_error(x, weight, ordered.dequantize()) < 0.9 * nearest


@pytest.mark.parametrize("symmetric", [True, False])
def test_every_gptq_weight_lies_on_the_layers_grid(symmetric):
    x = _correlated_inputs(1024, 64, seed=1)
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    scheme = wb.Scheme(3, symmetric, True, 0)
    scale, zero_point = row_qparams(weight, scheme)
    result = gptq_quantize(weight, _hessian(x), scheme, scale, zero_point, act_order=True)
    assert result.codes.dtype == torch.int16  # 8-bit codes and below: half of float32
    assert int(result.codes.min()) >= scheme.quant_min
    assert int(result.codes.max()) <= scheme.quant_max
    assert torch.equal(result.scale, scale.reshape(-1, 1))  # the layer's own scale, kept
    assert torch.equal(result.zero_point, zero_point.reshape(-1, 1))
    expected = (result.codes.to(torch.float32) - zero_point.reshape(-1, 1)) * scale.reshape(-1, 1)
    assert torch.equal(result.dequantize(), expected)
    # GPTQ moves codes by error feedback, yet never to the far side of the clipping range
    assert int((result.codes != torch.round(weight / scale.reshape(-1, 1))).sum()) > 0


def test_gptq_matches_the_explicit_inverse_formulation():
    x = _correlated_inputs(1024, 200, seed=3)  # 200 columns: two lazy blocks, the last partial
    weight = torch.randn(24, 200, generator=torch.Generator().manual_seed(4))
    scheme = wb.Scheme(4, False, True, 0)
    scale, zero_point = row_qparams(weight, scheme)
    result = gptq_quantize(weight, _hessian(x), scheme, scale, zero_point)
    reference = _reference_gptq(weight, _hessian(x), scheme, scale, zero_point)
    agree = float((result.codes.to(torch.float64) == reference).to(torch.float64).mean())
    assert agree > 0.99  # float32 against float64: a few ties may round apart


def test_act_order_undoes_its_permutation():
    generator = torch.Generator().manual_seed(5)
    x = _correlated_inputs(1024, 64, seed=5)
    weight = torch.randn(16, 64, generator=generator)
    scheme = wb.Scheme(4, True, True, 0)
    scale, zero_point = row_qparams(weight, scheme)
    hessian = _hessian(x)
    # columns already in decreasing Hessian diagonal: act-order is the identity order
    order = torch.argsort(torch.diagonal(hessian), descending=True)
    sorted_h, sorted_w = hessian[order][:, order], weight[:, order]
    plain = gptq_quantize(sorted_w, sorted_h, scheme, scale, zero_point)
    ordered = gptq_quantize(sorted_w, sorted_h, scheme, scale, zero_point, act_order=True)
    assert torch.equal(plain.codes, ordered.codes)
    # shuffled columns: act-order finds the same order and puts every code back in its column
    shuffle = torch.randperm(64, generator=generator)
    shuffled_w, shuffled_h = sorted_w[:, shuffle], sorted_h[shuffle][:, shuffle]
    shuffled = gptq_quantize(shuffled_w, shuffled_h, scheme, scale, zero_point, act_order=True)
    assert torch.equal(shuffled.codes, plain.codes[:, shuffle])


def test_dead_inputs_get_a_zero_weight():
    x = _correlated_inputs(512, 32, seed=6)
    x[:, [3, 17]] = 0.0  # two inputs never active on the calibration data
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(6))
    scheme = wb.Scheme(4, False, True, 0)
    scale, zero_point = row_qparams(weight, scheme)
    result = gptq_quantize(weight, _hessian(x), scheme, scale, zero_point)
    assert torch.equal(result.dequantize()[:, [3, 17]], torch.zeros(8, 2))
    assert torch.isfinite(result.dequantize()).all()


@pytest.mark.parametrize("act_order", [False, True])
def test_block_wise_gptq_beats_block_wise_round_to_nearest(act_order):
    x = _correlated_inputs(2048, 150, seed=8)  # 5 groups of 32, the last partial (22)
    weight = torch.randn(32, 150, generator=torch.Generator().manual_seed(8))
    scheme = wb.Scheme(4, True, False, 0)
    result = gptq_quantize(weight, _hessian(x), scheme, group_size=32, act_order=act_order)
    assert result.scale.shape == (32, 5)
    groups = [row_qparams(weight[:, g : g + 32], scheme)[0] for g in range(0, 150, 32)]
    static = torch.cat(groups, dim=1)
    if act_order:  # static groups: the scales of the original weights
        assert torch.equal(result.scale, static)
    else:  # the first group is reached before any update; later ones follow the updates
        assert torch.equal(result.scale[:, 0], static[:, 0])
    assert int(result.codes.min()) >= scheme.quant_min
    assert int(result.codes.max()) <= scheme.quant_max
    zero = torch.zeros_like(static, dtype=torch.int32)
    nearest = _nearest(weight, static, zero, scheme, group_size=32)
    group_of_column = torch.arange(150) // 32  # the last group holds columns 128..149
    column_scale = result.scale[:, group_of_column]
    assert torch.equal(result.dequantize(), result.codes.to(torch.float32) * column_scale)
    error = _output_error(x, weight, result.dequantize())
    assert error < 0.9 * _output_error(x, weight, nearest)


def test_conv_weights_and_inputs_as_matrices():
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=1).eval()
    x = torch.randn(2, 3, 9, 9)
    rows = input_rows(conv, x)  # one row per output position
    out = rows @ weight_matrix(conv).t() + conv.bias
    expected = conv(x).permute(0, 2, 3, 1).reshape(-1, 5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(from_matrix(weight_matrix(conv), conv), conv.weight.detach())
    conv1d = nn.Conv1d(4, 6, 3, padding=2, dilation=2).eval()
    x1 = torch.randn(2, 4, 11)
    out1 = input_rows(conv1d, x1) @ weight_matrix(conv1d).t() + conv1d.bias
    torch.testing.assert_close(
        out1, conv1d(x1).permute(0, 2, 1).reshape(-1, 6), rtol=1e-5, atol=1e-5
    )


# ---- wb.ptq ---------------------------------------------------------------------------------


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 64)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _mlp_and_batches():
    torch.manual_seed(0)
    model = _MLP().eval()
    x = _correlated_inputs(8 * 64, 32, seed=9)
    return model, list(x.split(64))


W3_WEIGHT_ONLY = dict(weight=wb.Scheme(3, True, True, 0), activation=None)


@pytest.fixture(scope="module")
def quantized():
    model, batches = _mlp_and_batches()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nearest = wb.ptq(model, batches, config=wb.QuantConfig(**W3_WEIGHT_ONLY), progress=False)
    config = wb.QuantConfig(**W3_WEIGHT_ONLY, weight_method="gptq")
    gptq = wb.ptq(model, batches, config=config, progress=False)
    return model, before, batches, nearest, gptq


def test_ptq_with_gptq_rounds_every_linear_and_leaves_the_user_model(quantized):
    model, before, batches, nearest, gptq = quantized
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    layers = dict(iter_quantized_layers(gptq.model))
    assert set(layers) == {"fc1", "fc2", "fc3"}
    assert all(isinstance(layer.weight_quantizer, GPTQWeightQuantizer) for layer in layers.values())
    assert {p.weight_rounding for p in gptq.plans if p.status == "quantized"} == {"gptq"}
    assert set(gptq.report.layers["weight_rounding"].dropna()) == {"gptq"}
    assert "gptq rounding" in gptq.report.summary["ptq_methods"]
    with torch.no_grad():
        x = torch.cat(batches)
        reference = gptq.fp32_model(x)
        error_nearest = (nearest.model(x) - reference).pow(2).mean()
        error_gptq = (gptq.model(x) - reference).pow(2).mean()
    assert float(error_gptq) < 0.8 * float(error_nearest)


def test_each_layer_is_quantized_on_the_inputs_of_the_quantized_layers_before_it(quantized):
    """The same three layers quantized by hand, one after the other, give the same codes."""
    _, _, batches, nearest, gptq = quantized
    x = torch.cat(batches)
    nearest_layers = dict(iter_quantized_layers(nearest.model))
    gptq_layers = dict(iter_quantized_layers(gptq.model))
    with torch.no_grad():
        for name in ("fc1", "fc2", "fc3"):
            layer = nearest_layers[name]
            scale, zero_point = layer.weight_quantizer.qparams(layer.weight)
            scheme = layer.weight_quantizer.scheme
            result = gptq_quantize(layer.weight, _hessian(x), scheme, scale, zero_point)
            got = gptq_layers[name].quantized_weight()
            assert float((got == result.dequantize()).float().mean()) > 0.99
            x = torch.relu(x @ result.dequantize().t() + layer.bias)


@pytest.mark.filterwarnings("ignore:.*did not fuse:UserWarning")  # weight-only: FP32 MatMul
def test_the_export_stores_the_gptq_codes(quantized, tmp_path):
    _, _, batches, _, gptq = quantized
    path = gptq.export_onnx(tmp_path / "gptq.onnx", batches[0][:1])
    graph = onnx.load(str(path)).graph
    integer = [
        numpy_helper.to_array(init)
        for init in graph.initializer
        if numpy_helper.to_array(init).dtype in (np.int8, np.uint8)
    ]
    for _, layer in iter_quantized_layers(gptq.model):
        codes = layer.weight_quantizer.codes.numpy().astype(np.int8)
        assert any(a.shape == codes.T.shape and np.array_equal(a, codes.T) for a in integer)


def test_gptq_with_quantized_activations_lowers_the_error():
    model, batches = _mlp_and_batches()
    w3a8 = dict(weight=wb.Scheme(3, True, True, 0), activation=wb.Scheme(8, False, False))
    nearest = wb.ptq(model, batches, config=wb.QuantConfig(**w3a8), progress=False)
    config = wb.QuantConfig(**w3a8, weight_method="gptq", gptq_act_order=True)
    gptq = wb.ptq(model, batches, config=config, progress=False)
    with torch.no_grad():
        x = torch.cat(batches)
        reference = gptq.fp32_model(x)
        error_nearest = (nearest.model(x) - reference).pow(2).mean()
        error_gptq = (gptq.model(x) - reference).pow(2).mean()
    assert float(error_gptq) < 0.8 * float(error_nearest)


def test_config_names_and_errors():
    assert wb.QuantConfig(weight_method="rtn").weight_method == "nearest"
    assert wb.QuantConfig(weight_method="gptq", gptq_act_order=True).ptq_methods() == [
        "gptq rounding (act-order)"
    ]
    with pytest.raises(ConfigError, match="gptq_act_order"):
        wb.QuantConfig(weight_method="gptq", gptq_act_order="yes")
    with pytest.raises(ConfigError, match="gptq"):
        wb.QuantConfig(weight_method="optq")
    model, batches = _mlp_and_batches()
    with pytest.raises(ConfigError, match="weight_method='gptq'"):
        wb.qat(
            model,
            [(b, torch.zeros(len(b), dtype=torch.long)) for b in batches],
            config=wb.QuantConfig(weight_method="gptq"),
            loss_fn=nn.CrossEntropyLoss(),
        )


def test_the_magic_and_the_panel_offer_gptq():
    from workbench.engine.config import WEIGHT_METHODS
    from workbench.notebook.magic_args import parse_line
    from workbench.notebook.recipe import make_recipe

    config = make_recipe(parse_line("model --calib calib --weight-method gptq")).config()
    assert config == wb.QuantConfig(weight_method="gptq")
    assert "gptq" in WEIGHT_METHODS  # the panel's dropdown lists these


class _Conv1DBlock(nn.Module):
    """GPT-2's MLP shape: transformers' Conv1D projections (weight [in, out])."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D as conv1d

        self.c_fc = conv1d(96, 32)
        self.c_proj = conv1d(32, 96)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(torch.relu(self.c_fc(x)))


def test_gpt2_conv1d_block_wise_gptq_exports_its_codes(tmp_path):
    """GPT-2's Conv1D at 4 bits in groups of 32: GPTQ rounds it, beats round-to-nearest, and
    ONNX Runtime's MatMulNBits (FP32 compute) runs exactly the simulated weights."""
    import onnxruntime as ort

    torch.manual_seed(0)
    model = _Conv1DBlock().eval()
    x = _correlated_inputs(8 * 64, 32, seed=10).reshape(8, 8, 8, 32)
    batches = list(x)
    scheme = wb.Scheme(4, False, True, 0, group_size=32)
    nearest = wb.ptq(
        model, batches, config=wb.QuantConfig(weight=scheme, activation=None), progress=False
    )
    config = wb.QuantConfig(weight=scheme, activation=None, weight_method="gptq")
    gptq = wb.ptq(model, batches, config=config, progress=False)
    assert {p.weight_rounding for p in gptq.plans if p.status == "quantized"} == {"gptq"}
    layers = dict(iter_quantized_layers(gptq.model))
    assert layers["c_proj"].weight_quantizer.scale.shape == (32, 3)  # 96 inputs, 3 groups
    with torch.no_grad():
        flat = torch.cat(batches)
        reference = model(flat)
        error_nearest = (nearest.model(flat) - reference).pow(2).mean()
        error_gptq = (gptq.model(flat) - reference).pow(2).mean()
        simulated = gptq.model(batches[0]).numpy()
    assert float(error_gptq) < 0.8 * float(error_nearest)
    path = gptq.export_onnx(tmp_path / "gptq_g32.onnx", batches[0], accuracy_level=1)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: batches[0].numpy()}
    np.testing.assert_allclose(session.run(None, feed)[0], simulated, rtol=1e-4, atol=1e-4)


class _SharedLinear(nn.Module):
    """One Linear called at two sites (its Hessian sums both calls' inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 32)
        self.head = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(torch.relu(self.fc(x))))


def test_a_layer_called_at_two_sites_is_rounded_on_both_calls_inputs():
    torch.manual_seed(0)
    model = _SharedLinear().eval()
    batches = list(_correlated_inputs(8 * 64, 32, seed=11).split(64))
    w3a8 = dict(weight=wb.Scheme(3, True, True, 0), activation=wb.Scheme(8, False, False))
    nearest = wb.ptq(model, batches, config=wb.QuantConfig(**w3a8), progress=False)
    gptq = wb.ptq(
        model, batches, config=wb.QuantConfig(**w3a8, weight_method="gptq"), progress=False
    )
    assert {p.weight_rounding for p in gptq.plans if p.status == "quantized"} == {"gptq"}
    with torch.no_grad():
        x = torch.cat(batches)
        reference = model(x)
        error_nearest = (nearest.model(x) - reference).pow(2).mean()
        error_gptq = (gptq.model(x) - reference).pow(2).mean()
    assert float(error_gptq) < float(error_nearest)
