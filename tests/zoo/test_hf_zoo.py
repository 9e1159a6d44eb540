"""transformers' own model classes, end to end (``hf_zoo``: image, text encoders, decoders,
speech; tiny configs, random weights, offline).

For each architecture, one test shares its expensive steps across the checks:

1. ``wb.ptq`` (int8 at the weight width where ONNX Runtime's kernels compute the simulation
   exactly on this CPU: the ``ort_exact_int8`` fixture);
2. every quantized layer's reported output SQNR is within 1 dB of an independent
   measurement: forward hooks that copy each layer's output, on the user's FP32 model (the
   BatchNorm's output where one was folded into the layer) and on ``res.model``, same batches;
3. the export, and ONNX Runtime's fusion: every quantized layer on an integer kernel, or kept
   FP32 with its reason in the report;
4. ONNX Runtime against the simulation: closer to it than the simulation is to FP32
   (``parity_bounds``: a bound from the quantization, on every CPU);
5. the user's model gives bit-identical outputs (and keeps every tensor and class) after
   ``wb.ptq``, ``export_onnx``, ``wb.qat`` (one short step) and ``wb.sensitivity``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import workbench as wb
from tests.parity_bounds import assert_parity_within_quantization_error
from workbench.engine.calibration.batches import output_tensor

from .hf_zoo import ZOO
from .layer_outputs import check_report_against_hooks

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


def _snapshot(model: nn.Module, batch: dict) -> tuple:
    with torch.no_grad():
        output = output_tensor(model(**batch)).clone()
    state = {key: value.clone() for key, value in model.state_dict().items()}
    classes = [(name, type(module)) for name, module in model.named_modules()]
    return output, state, classes, model.training


def _assert_unchanged(model: nn.Module, batch: dict, before: tuple, after_what: str) -> None:
    output, state, classes, training = _snapshot(model, batch)
    assert torch.equal(output, before[0]), f"model output changed after {after_what}"
    assert state.keys() == before[1].keys(), after_what
    for key, value in state.items():
        assert torch.equal(value, before[1][key]), (after_what, key)
    assert classes == before[2], after_what
    assert training == before[3], after_what


@pytest.mark.parametrize("name", list(ZOO))
def test_library_model_end_to_end(name, tmp_path, ort_exact_int8):
    entry = ZOO[name]
    model = entry.build()
    calib, held_out = entry.data(0, 2), entry.data(1, 2)
    before = _snapshot(model, held_out[0])

    result = wb.ptq(model, calib, config=ort_exact_int8, progress=False)
    _assert_unchanged(model, held_out[0], before, "wb.ptq")
    assert check_report_against_hooks(model, result, calib) > 0

    path = result.export_onnx(tmp_path / f"{name}.onnx", held_out[0], check_fusion=False)
    _assert_unchanged(model, held_out[0], before, "export_onnx")
    fusion = result.fusion(path, warn=False)
    layers = result.report.layers.set_index("layer")
    assert set(fusion.table["layer"]) == set(layers.index[layers["status"] == "quantized"])
    assert fusion.unfused == [], fusion.table[~fusion.table["fused"].astype(bool)]
    kept = layers[layers["status"] != "quantized"]
    assert (kept["reason"].fillna("") != "").all(), kept["reason"]

    # ORT's integer kernels compute the simulation's codes exactly (ort_exact_int8); float ops
    # between them (GELU as Erf, LayerNorm, softmax) may flip a rounding at the next quantizer
    assert_parity_within_quantization_error(result.parity(path, held_out).table.iloc[0])

    def loss_fn(output, batch):
        return output_tensor(output).float().pow(2).mean()

    wb.qat(model, calib[:1], config=ort_exact_int8, loss_fn=loss_fn, epochs=1, progress=False)
    _assert_unchanged(model, held_out[0], before, "wb.qat")
    wb.sensitivity(model, calib[:1], config=ort_exact_int8, progress=False)
    _assert_unchanged(model, held_out[0], before, "wb.sensitivity")
