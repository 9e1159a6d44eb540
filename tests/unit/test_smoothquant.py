"""SmoothQuant (engine.algorithms.smoothquant): where the smoothing goes in each structure, the
scale
against the paper's formula computed here from hooked activations, the FP32 function kept, the
user's model untouched, and the outlier BERT's accuracy recovered (in the simulation and in
ONNX Runtime)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import workbench as wb
from tests.parity_bounds import assert_within_quantization_error
from workbench.engine.algorithms.smoothquant import (
    FOLD_LAYERNORM,
    FOLD_LINEAR,
    FOLD_MUL,
    SKIP_OTHER_PRODUCER,
)
from workbench.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zoo import text
from zoo.outlier_bert import outlier_bert, outlier_tokens

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _stack() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.LayerNorm(16),
        nn.Linear(16, 32),  # 1: after the LayerNorm
        nn.Linear(32, 24),  # 2: after a Linear
        nn.ReLU(),
        nn.Linear(24, 8),  # 4: after a ReLU
    ).eval()
    with torch.no_grad():
        model[0].weight[[3, 7]] *= 40.0  # outlier channels
    return model


def _batches(count: int = 3, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 5, 16, generator=generator) for _ in range(count)]


def _plans(result) -> dict:
    return {plan.name: plan for plan in result.plans}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_sequential_stack_folds_into_layernorm_and_linear_and_reports_the_rest():
    model, batches = _stack(), _batches()
    before = copy.deepcopy(model.state_dict())
    result = wb.ptq(model, batches, config=wb.QuantConfig(smoothquant=0.5), progress=False)
    plans = _plans(result)
    assert (plans["1"].smoothing_fold, plans["1"].smoothing_alpha) == (FOLD_LAYERNORM, 0.5)
    assert plans["2"].smoothing_fold == FOLD_LINEAR
    assert plans["4"].smoothing_fold is None
    assert plans["4"].smoothing_skipped == SKIP_OTHER_PRODUCER
    for key, value in model.state_dict().items():  # the user's model is untouched
        assert torch.equal(value, before[key]), key
    with torch.no_grad():
        for batch in batches:
            assert _relative(result.fp32_model(batch), model(batch)) < 1e-5


def test_scale_follows_the_formula_from_the_activations():
    model, batches = _stack(), _batches()
    with torch.no_grad():
        normed = torch.cat([model[0](b).reshape(-1, 16) for b in batches])
    amax = normed.abs().amax(dim=0)
    wmax = model[1].weight.abs().amax(dim=0)
    alpha = 0.7
    expected = amax**alpha / wmax ** (1 - alpha)
    result = wb.ptq(model, batches, config=wb.QuantConfig(smoothquant=alpha), progress=False)
    norm = result.fp32_model[0]
    torch.testing.assert_close(norm.weight, model[0].weight / expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(norm.bias, model[0].bias / expected, rtol=1e-5, atol=1e-7)
    # its columns grow by s (its rows also shrink by the next group's scale: compare ratios)
    ratio = result.fp32_model[1].weight / model[1].weight
    torch.testing.assert_close(
        ratio / ratio[:, :1], (expected / expected[0]).expand_as(ratio), rtol=1e-4, atol=0
    )


def test_smoothing_narrows_the_quantized_input_range_relative_to_its_channels():
    model, batches = _stack(), _batches()
    plain = wb.ptq(model, batches, config="int8", progress=False)
    smoothed = wb.ptq(model, batches, config=wb.QuantConfig(smoothquant=0.5), progress=False)
    with torch.no_grad():
        errors = [
            float(F.mse_loss(r.model(batches[0]), model(batches[0]))) for r in (plain, smoothed)
        ]
    assert errors[1] < errors[0]


def test_gpt2_conv1d_blocks_fold_into_their_layernorms():
    model = text.gpt2()
    data = text.tokens(2, vocab=text.DECODER_VOCAB)
    result = wb.ptq(model, data, config=wb.QuantConfig(smoothquant=0.5), progress=False)
    plans = _plans(result)
    for block in range(2):
        for layer in ("attn.c_attn", "mlp.c_fc"):
            assert plans[f"transformer.h.{block}.{layer}"].smoothing_fold == FOLD_LAYERNORM
    with torch.no_grad():
        expected = model(**data[0]).logits
        assert _relative(result.fp32_model(**data[0]).logits, expected) < 1e-5


def test_vit_blocks_fold_into_their_layernorms():
    model = text.vit()
    from zoo import vision

    data = vision.images(2, 32, batch=2)
    result = wb.ptq(model, data, config=wb.QuantConfig(smoothquant=0.5), progress=False)
    plans = _plans(result)
    folds = {name: plan.smoothing_fold for name, plan in plans.items()}
    assert folds["layers.0.attention.q_proj"] == FOLD_LAYERNORM
    assert folds["layers.0.mlp.fc1"] == FOLD_LAYERNORM
    with torch.no_grad():
        expected = model(data[0]).last_hidden_state
        assert _relative(result.fp32_model(data[0]).last_hidden_state, expected) < 1e-5


def test_config_rejects_bad_alpha():
    for bad in (1.5, -0.1, True, "half"):
        with pytest.raises(ConfigError, match="smoothquant"):
            wb.QuantConfig(smoothquant=bad)
    assert "SmoothQuant (alpha auto)" in wb.QuantConfig(smoothquant="auto").ptq_methods()


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_outlier_bert_recovers_with_smoothquant_in_simulation_and_onnx_runtime(
    tmp_path, ort_exact_int8
):
    """Post-LN BERT: the LayerNorm also feeds the residual, so the smoothing is a Mul in front
    of each Linear; the exported graph runs it (ORT against the simulation and FP32)."""
    from workbench.runtime.ort_session import make_session, run_session

    model = outlier_bert()
    calib, test = outlier_tokens(4), outlier_tokens(1, seed=5)[0]
    with torch.no_grad():
        expected = model(**test).last_hidden_state.numpy()
    config = wb.QuantConfig(weight=ort_exact_int8.weight, smoothquant=0.5)
    result = wb.ptq(model, calib, config=config, progress=False)
    plans = _plans(result)
    assert plans["encoder.layer.0.attention.self.query"].smoothing_fold == FOLD_MUL
    assert plans["encoder.layer.1.intermediate.dense"].smoothing_fold == FOLD_MUL
    with torch.no_grad():
        simulated = result.model(**test).last_hidden_state.numpy()
    assert _cosine(simulated, expected) >= 0.995
    path = result.export_onnx(tmp_path / "bert.onnx", test)
    session = make_session(path, optimize=False)
    ort_output = run_session(session, test)[0]
    assert_within_quantization_error(ort_output, simulated, expected)
    assert _cosine(ort_output, expected) >= 0.995


def test_magic_option_sets_the_config():
    from IPython.core.error import UsageError

    from workbench.notebook.magic_args import parse_line
    from workbench.notebook.recipe import make_recipe

    for given, alpha in (("0.5", 0.5), ("auto", "auto"), ("0", 0.0)):
        recipe = make_recipe(parse_line(f"model --calib calib --smoothquant {given}"))
        assert recipe.config() == wb.QuantConfig(smoothquant=alpha)
    for bad in ("1.5", "half"):
        with pytest.raises(UsageError, match="smoothquant"):
            make_recipe(parse_line(f"model --calib calib --smoothquant {bad}"))


def test_panel_control_sets_the_config():
    from workbench.notebook.panel import WorkbenchPanel

    app = WorkbenchPanel(_stack(), _batches(1))
    assert app.config().smoothquant is None
    for alpha in ("auto", 0.5, 0.3):
        app.set_controls(smoothquant=alpha)
        assert app.config() == wb.QuantConfig(smoothquant=alpha)


class _PostNorm(nn.Module):
    """LayerNorm -> Linear with the LayerNorm's output also added to the result (post-LN):
    the smoothing becomes the Linear's own Mul."""

    def __init__(self) -> None:
        super().__init__()
        stack = _stack()
        self.norm, self.fc = stack[0], stack[1]

    def forward(self, x):
        h = self.norm(x)
        return self.fc(h)[..., :16] + h


def test_weight_rounding_sees_the_smoothed_input():
    """AdaRound's captured input and GPTQ's Hessian are of the input the layer multiplies its
    smoothed weight with: ``Q(x / s)``, computed here from the LayerNorm's output."""
    from workbench.engine.algorithms.adaround import _capture
    from workbench.engine.algorithms.gptq import layer_hessian
    from workbench.engine.placement.layers import iter_quantized_layers

    model, batches = _PostNorm().eval(), _batches()
    result = wb.ptq(model, batches, config=wb.QuantConfig(smoothquant=0.5), progress=False)
    assert _plans(result)["fc"].smoothing_fold == FOLD_MUL
    layer = dict(iter_quantized_layers(result.model))["fc"]
    with torch.no_grad():
        rows = torch.cat([model.norm(b).reshape(-1, 16) for b in batches])
        expected = layer.input_quantizer(rows * layer.layer.input_scale)
    captured, _ = _capture(result.fp32_model, result.model, "fc", batches)
    torch.testing.assert_close(captured.reshape(-1, 16), expected)
    hessian = layer_hessian(result.model, layer, batches)
    torch.testing.assert_close(hessian, 2.0 * expected.t() @ expected / len(expected))
