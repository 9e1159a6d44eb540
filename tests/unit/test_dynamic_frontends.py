"""The int8-dynamic preset through the front ends: the %quantize magic (no --calib needed) and
the panel's preset choice, each against wb.ptq called directly."""

from __future__ import annotations

import onnx
import pytest
import torch
from digits_models import tiny_mlp
from IPython.core.error import UsageError

import workbench as wb
from workbench.engine.quantizers.dynamic import DynamicActivationQuantizer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def model():
    return tiny_mlp()


def dynamic_inputs(result) -> int:
    return sum(isinstance(m, DynamicActivationQuantizer) for m in result.model.modules())


def test_magic_preset_needs_no_calibration_data(shell, model, digits):
    result = shell.run_line_magic("quantize", "model --preset int8-dynamic")
    assert result.config == wb.QuantConfig.preset("int8-dynamic")
    assert dynamic_inputs(result) == 2
    direct = wb.ptq(model, config="int8-dynamic")
    with torch.no_grad():
        assert torch.equal(result.model(digits.test_x), direct.model(digits.test_x))


def test_magic_with_calibration_data_reports_layer_errors(shell):
    result = shell.run_line_magic("quantize", "model --calib calib --preset int8-dynamic")
    assert result.config.dynamic
    assert result.report.layers["output_sqnr_db"].notna().any()


def test_magic_export_without_calib_asks_for_an_example(shell, tmp_path):
    with pytest.raises(UsageError, match="--example"):
        shell.run_line_magic("quantize", f"model --preset int8-dynamic --export {tmp_path}/m.onnx")
    path = tmp_path / "m.onnx"
    shell.run_line_magic("quantize", f"model --preset int8-dynamic --export {path} --example x")
    types = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert types.count("DynamicQuantizeLinear") == 2 and "QuantizeLinear" not in types


def test_static_preset_without_calib_still_asks_for_it(shell):
    with pytest.raises(UsageError, match="int8-dynamic"):
        shell.run_line_magic("quantize", "model --preset int8")


def test_qat_with_the_dynamic_preset_is_one_line_error(shell):
    with pytest.raises(UsageError, match=r"wb\.ptq"):
        shell.run_line_magic(
            "quantize", "model --method qat --train train --loss loss_fn --preset int8-dynamic"
        )


def test_panel_offers_the_preset_and_runs_it(model, digits):
    app = wb.panel(model, digits.calib_batches(2, 32))
    assert "int8-dynamic" in app.preset.options
    app.preset.value = "int8-dynamic"
    assert app.config() == wb.QuantConfig.preset("int8-dynamic")
    app.run_button.click()
    assert app.error == ""
    assert app.result.config.dynamic and dynamic_inputs(app.result) == 2
    direct = wb.ptq(model, digits.calib_batches(2, 32), config="int8-dynamic", progress=False)
    with torch.no_grad():
        assert torch.equal(app.result.model(digits.test_x), direct.model(digits.test_x))
