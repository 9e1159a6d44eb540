"""Export of ordinary model structures: adaptive average pooling to any size, multi-input
forwards (the example input and calibration batch rules), errors from the user's forward, and
a file that does not depend on the exporting CPU."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import workbench as wb
from workbench.errors import CalibrationError, ExportError
from workbench.runtime.ort_session import make_session

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class PooledTo(nn.Module):
    def __init__(self, size, cells: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(size)
        self.fc = nn.Linear(8 * cells, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.relu(self.conv(x))), 1))


class TwoInputs(nn.Module):
    """``forward(ids, mask)``: two required positional tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 3)

    def forward(self, ids, mask):
        hidden = self.embed(ids) * mask.unsqueeze(-1)
        return self.fc(hidden.sum(1) / mask.sum(1, keepdim=True))


def _tokens(seed: int, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (batch, 6), generator=generator)
    return ids, torch.ones(batch, 6)


@pytest.mark.parametrize("size", [2, (2, 2)])
def test_adaptive_average_pooling_to_any_size_exports(tmp_path, size):
    torch.manual_seed(0)
    model = PooledTo(size).eval()
    data = torch.randn(8, 3, 8, 8)
    result = wb.ptq(model, [data], progress=False)
    path = result.export_onnx(tmp_path / "pooled.onnx", data[:1], check_fusion=False)
    fusion = result.fusion(path, warn=False)
    pool = fusion.ops[fusion.ops["kind"] == "average pool"].iloc[0]
    assert pool["kernel"] == "QLinearAveragePool"
    session = make_session(path, 1, optimize=False)
    x = torch.randn(3, 3, 8, 8)  # another batch size: only the batch axis is dynamic
    with torch.no_grad():
        expected = result.model(x).numpy()
    got = session.run(None, {"input": x.numpy()})[0]
    step = float(result.model.fc.input_quantizer.scale)
    assert np.abs(got - expected).max() <= 2 * step * float(model.fc.weight.abs().sum(1).max())


@pytest.mark.parametrize(("size", "image"), [((3, 3), 8), ((7, 7), 10), ((3, 2), 7)])
def test_adaptive_average_pooling_with_uneven_windows_exports(tmp_path, size, image):
    torch.manual_seed(0)
    model = PooledTo(size, size[0] * size[1]).eval()
    data = torch.randn(8, 3, image, image)
    result = wb.ptq(model, [data], progress=False)
    path = result.export_onnx(tmp_path / "uneven.onnx", data[:1], check_fusion=False)
    graph = onnx.load(str(path)).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, image, image]  # only the batch axis is dynamic
    session = make_session(path, 1, optimize=False)  # every QDQ node as written
    x = torch.randn(5, 3, image, image, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = result.model(x).numpy()
    got = session.run(None, {"input": x.numpy()})[0]
    # the same windows; float sums in another order may move a value by one input step
    step = float(result.model.fc.input_quantizer.scale)
    assert np.abs(got - expected).max() <= step * float(model.fc.weight.abs().sum(1).max())
    assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.9999


def test_a_tuple_example_input_is_the_positional_inputs(tmp_path):
    torch.manual_seed(0)
    model = TwoInputs().eval()
    result = wb.ptq(model, [_tokens(1), _tokens(2)], progress=False)
    path = result.export_onnx(tmp_path / "two.onnx", _tokens(3), check_fusion=False)
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["input_0", "input_1"]
    ids, mask = _tokens(4)
    session = make_session(path, 1, optimize=False)
    got = session.run(None, {"input_0": ids.numpy(), "input_1": mask.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, result.model(ids, mask).numpy(), atol=1e-5)


def test_calibration_batches_follow_the_forward_s_positional_inputs():
    torch.manual_seed(0)
    ids, mask = _tokens(1)
    labels = torch.zeros(4, dtype=torch.long)
    result = wb.ptq(TwoInputs().eval(), [(ids, mask, labels)], progress=False)  # + targets
    assert result.model.fc.input_quantizer.calibrated
    with pytest.raises(CalibrationError, match=r"takes 2 positional inputs.*dicts of keyword"):
        wb.ptq(TwoInputs().eval(), [(ids,)], progress=False)


def test_an_error_in_the_forward_during_export_is_an_export_error(tmp_path):
    torch.manual_seed(0)
    result = wb.ptq(TwoInputs().eval(), [_tokens(1)], progress=False)
    with pytest.raises(ExportError, match=r"example_input could not run.*tuple of the forward"):
        result.export_onnx(tmp_path / "bad.onnx", _tokens(1)[0], check_fusion=False)
    assert not (tmp_path / "bad.onnx").exists()


def test_the_default_export_does_not_depend_on_the_cpu(tmp_path):
    torch.manual_seed(0)
    data = torch.randn(8, 3, 8, 8)
    result = wb.ptq(PooledTo(2).eval(), [data], progress=False)
    path = result.export_onnx(tmp_path / "default.onnx", data[:1], check_fusion=False)
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    assert not np.any(inits["conv.weight_zero_point"])  # amx=False: symmetric int8 weights
    with pytest.raises(ExportError, match="amx must be True, False or 'auto'"):
        result.export_onnx(tmp_path / "x.onnx", data[:1], amx="yes", check_fusion=False)


@pytest.mark.parametrize("layout", ["nested", "flat"])
def test_qat_targets_follow_the_batch_rule_of_a_multi_input_forward(layout):
    torch.manual_seed(0)
    batches = []
    for seed in range(3):
        ids, mask = _tokens(seed)
        labels = torch.randint(0, 3, (4,), generator=torch.Generator().manual_seed(seed + 9))
        batches.append(((ids, mask), labels) if layout == "nested" else (ids, mask, labels))
    seen = []

    def loss_fn(output, target):
        seen.append(target)
        return nn.functional.cross_entropy(output, target)

    model = TwoInputs().eval()
    result = wb.qat(model, batches, loss_fn=loss_fn, epochs=1, lr=1e-3, progress=False)
    labels = [batch[-1] for batch in batches]
    assert all(any(target is label for label in labels) for target in seen)
    assert len(seen) >= len(batches)  # the loss check, then every training batch
    ids, mask = _tokens(7)
    with torch.no_grad():
        assert result.model(ids, mask).shape == (4, 3)


def test_qat_batches_of_a_multi_input_forward_without_clear_targets_are_one_error():
    ids, mask = _tokens(1)
    labels = torch.zeros(4, dtype=torch.long)
    for batch in ((ids, mask), (ids, mask, labels, labels)):
        with pytest.raises(
            CalibrationError, match=r"targets is ambiguous.*\(\(x0, x1\), targets\)"
        ):
            wb.qat(
                TwoInputs().eval(),
                [batch],
                loss_fn=nn.functional.cross_entropy,
                progress=False,
            )


def test_nested_input_tuples_calibrate_and_are_checked():
    ids, mask = _tokens(1)
    labels = torch.zeros(4, dtype=torch.long)
    result = wb.ptq(TwoInputs().eval(), [((ids, mask), labels)], progress=False)
    assert result.model.fc.input_quantizer.calibrated
    with pytest.raises(CalibrationError, match=r"inputs are a tuple of 1 item"):
        wb.ptq(TwoInputs().eval(), [((ids,), labels)], progress=False)
