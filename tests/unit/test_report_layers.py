"""report.layers, report.summary, the plots and the notebook display, against values computed
here from the models with plain torch."""

from __future__ import annotations

import math
import pathlib

import matplotlib
import pytest
import torch
from torch import nn

import workbench as wb

matplotlib.use("Agg")

ISSUE_COLUMNS = [
    "layer",
    "type",
    "weight_shape",
    "scheme",
    "bits",
    "num_scales",
    "scale_min",
    "scale_max",
    "zero_point",
    "weight_mse",
    "weight_sqnr_db",
    "output_sqnr_db",
    "output_cosine",
    "status",
    "reason",
]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.norm = nn.LayerNorm(6)
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.fc2(torch.relu(self.fc1(self.norm(x))))


def batches(n: int = 3, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 1, 8, 8, generator=generator) for _ in range(n)]


LABELS = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def result():
    torch.manual_seed(0)
    model = Net().eval()
    data = batches()

    def eval_fn(m: nn.Module) -> float:
        with torch.no_grad():
            return float((m(data[0]).argmax(1) == LABELS).float().mean())

    res = wb.ptq(model, data, eval_fn=eval_fn, progress=False)
    return model, data, eval_fn, res


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    reference, approx = reference.double(), approx.double()
    return 10 * math.log10(float((reference**2).sum() / ((reference - approx) ** 2).sum()))


def test_layers_has_the_issue_columns_and_one_row_per_parameter_layer(result):
    model, _, _, res = result
    layers = res.report.layers
    assert set(ISSUE_COLUMNS) <= set(layers.columns)
    holders = {name for name, m in model.named_modules() if list(m.parameters(recurse=False))}
    assert sorted(layers["layer"]) == sorted(holders)
    assert len(layers) == len(holders)
    rows = layers.set_index("layer")
    assert rows.loc["conv", "weight_shape"] == (6, 1, 3, 3)
    assert rows.loc["fc1", "type"] == "Linear" and rows.loc["conv", "type"] == "Conv2d"
    assert rows.loc["norm", "status"] == "fp32" and "LayerNorm" in rows.loc["norm", "reason"]
    assert rows.loc["bn", "reason"] == "folded into conv"
    assert rows.loc["bn", "folded_into"] == "conv"  # the fact as a field, for renderers
    assert rows["folded_into"].drop("bn").isna().all()
    assert (rows.loc[["conv", "fc1", "fc2"], "status"] == "quantized").all()
    assert (rows.loc[["conv", "fc1", "fc2"], "bits"] == 8).all()
    assert rows.loc["fc1", "num_scales"] == 16


@pytest.mark.parametrize("name", ["conv", "fc1", "fc2"])
def test_weight_columns_match_torch_fake_quant(result, name):
    _, _, _, res = result
    row = res.report.layers.set_index("layer").loc[name]
    layer = res.model.get_submodule(name)
    weight = res.fp32_model.get_submodule(name).weight.detach()  # BN already folded
    scale = weight.flatten(1).abs().amax(dim=1) / 127
    zero_point = torch.zeros(weight.shape[0], dtype=torch.int32)
    fake = torch.fake_quantize_per_channel_affine(weight, scale, zero_point, 0, -128, 127)
    torch.testing.assert_close(layer.weight_quantizer.scale, scale)
    assert row["scale_min"] == pytest.approx(float(scale.min()), rel=1e-6)
    assert row["scale_max"] == pytest.approx(float(scale.max()), rel=1e-6)
    assert row["zero_point"] == "0"
    assert row["scheme"] == "int8 sym per-channel"
    assert row["weight_mse"] == pytest.approx(float(((weight - fake) ** 2).mean()), rel=1e-6)
    assert row["weight_sqnr_db"] == pytest.approx(sqnr_db(weight, fake), rel=1e-6)
    assert row["input_scale"] == pytest.approx(float(layer.input_quantizer.scale))


def test_output_errors_measured_against_fp32(result):
    model, data, _, res = result
    row = res.report.layers.set_index("layer").loc["fc2"]
    # fc2 is the last layer: its output is the model's output
    with torch.no_grad():
        reference = torch.cat([model(x) for x in data])
        quantized = torch.cat([res.model(x) for x in data])
    assert row["output_sqnr_db"] == pytest.approx(sqnr_db(reference, quantized), rel=1e-6)
    expected_cosine = float(
        nn.functional.cosine_similarity(reference.flatten(), quantized.flatten(), dim=0)
    )
    assert row["output_cosine"] == pytest.approx(expected_cosine, abs=1e-6)
    summary = res.report.summary
    assert summary["model_output_cosine"] == pytest.approx(expected_cosine, abs=1e-6)
    assert summary["model_output_sqnr_db"] == pytest.approx(row["output_sqnr_db"], rel=1e-6)
    # conv's output in the quantized model against the (folded) FP32 conv's output
    outputs = {}
    hooks = [
        res.fp32_model.conv.register_forward_hook(lambda m, i, o: outputs.setdefault("fp32", o)),
        res.model.conv.register_forward_hook(lambda m, i, o: outputs.setdefault("quant", o)),
    ]
    with torch.no_grad():
        res.fp32_model(data[0])
        res.model(data[0])
    for hook in hooks:
        hook.remove()
    conv_row = res.report.layers.set_index("layer").loc["conv"]
    single_batch = sqnr_db(outputs["fp32"], outputs["quant"])
    assert abs(conv_row["output_sqnr_db"] - single_batch) < 1.0  # all batches vs the first


def test_summary(result, onnx_reference_top1):
    model, data, _, res = result
    summary = res.report.summary
    layers = res.report.layers
    quantized = layers[layers["status"] == "quantized"]
    assert summary["layers_quantized"] == 3
    folded = layers[(layers["status"] == "fp32") & layers["folded_into"].notna()]
    assert list(folded["layer"]) == ["bn"] and summary["layers_folded"] == 1
    assert summary["layers_fp32"] == 1  # folded layers are counted apart, not as kept FP32
    assert summary["compression_ratio"] == pytest.approx(
        summary["fp32_bytes"] / summary["quantized_bytes"]
    )
    assert summary["compression_ratio"] > 1.0
    assert summary["worst_output_sqnr_db"] == pytest.approx(quantized["output_sqnr_db"].min())
    assert summary["mean_output_sqnr_db"] == pytest.approx(quantized["output_sqnr_db"].mean())
    ordered = list(quantized.sort_values("output_sqnr_db")["layer"])
    assert summary["worst_layers"] == ordered[:5]
    # the metric recomputed without eval_fn: FP32 from the model, the quantized one from the
    # exported integers run by ONNX's reference implementation
    with torch.no_grad():
        fp32 = float((model(data[0]).argmax(1) == LABELS).double().mean())
    quantized = onnx_reference_top1(res, data[0], LABELS) / 100.0
    assert summary["metric_fp32"] == pytest.approx(fp32, abs=1e-9)
    # a tie rounded the other way may flip one of the 16 samples
    assert summary["metric_quantized"] == pytest.approx(quantized, abs=1 / 16 + 1e-9)
    assert summary["metric_drop"] == pytest.approx(
        summary["metric_fp32"] - summary["metric_quantized"]
    )


def test_summary_without_eval_fn_has_no_metric():
    res = wb.ptq(nn.Linear(4, 2), torch.randn(8, 4), progress=False)
    assert "metric_fp32" not in res.report.summary
    assert "metric" not in res.report.summary_text()


def test_worst_layers_lists_at_most_five():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(7)])
    res = wb.ptq(model, torch.randn(16, 8), progress=False)
    assert len(res.report.summary["worst_layers"]) == 5


def test_plots_return_figures(result):
    from matplotlib.figure import Figure

    _, _, _, res = result
    layers = res.report.layers
    quantized = layers[layers["status"] == "quantized"]

    fig = res.report.plot_sqnr()
    assert isinstance(fig, Figure)
    bars = fig.axes[0].patches
    assert [b.get_height() for b in bars] == pytest.approx(
        list(quantized["output_sqnr_db"].clip(upper=80.0))
    )
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == list(quantized["layer"])

    fig = res.report.plot_storage()
    assert isinstance(fig, Figure)
    storage = res.report.storage
    rows = storage[storage["layer"] != "TOTAL"]
    heights = [b.get_height() for b in fig.axes[0].patches]
    parts = ["weight_bytes", "scale_bytes", "zero_point_bytes", "bias_bytes"]
    present = [part for part in parts if rows[part].any()]  # a 0 B piece has no bars
    assert len(heights) == (1 + len(present)) * len(rows)
    assert heights[: len(rows)] == pytest.approx(list(rows["fp32_bytes"] / 1024))

    fig = res.report.plot_weight_histogram("fc1")
    assert isinstance(fig, Figure)
    wq = res.model.fc1.weight_quantizer
    channel = int(torch.argmax(wq.scale))
    s = float(wq.scale[channel])
    edges = sorted({float(line.get_xdata()[0]) for line in fig.axes[0].lines})
    assert edges[0] == pytest.approx(-128 * s) and edges[-1] == pytest.approx(127 * s)
    assert "fc1" in fig.axes[0].get_title()
    # default: the worst layer
    worst = res.report.summary["worst_layers"][0]
    assert worst in res.report.plot_weight_histogram().axes[0].get_title()


def test_weight_histogram_of_an_unknown_layer(result):
    _, _, _, res = result
    with pytest.raises(wb.ConfigError, match="fc1"):
        res.report.plot_weight_histogram("norm")


def test_four_bit_histogram_draws_the_grid():
    torch.manual_seed(0)
    res = wb.ptq(nn.Linear(16, 4), torch.randn(8, 16), config="int4-weight", progress=False)
    fig = res.report.plot_weight_histogram("(model)")
    # 16 grid lines (one per code) plus the two clipping lines
    assert len(fig.axes[0].lines) == 16 + 2


XSS_NAME = "<img src=x onerror=alert(1)>"


def test_html_escapes_layer_names(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module(XSS_NAME, nn.Linear(4, 8))
    model.add_module("act", nn.ReLU())
    model.add_module("<b>out</b>", nn.Linear(8, 2))
    res = wb.ptq(model, [torch.randn(5, 4)], progress=False)
    assert XSS_NAME in list(res.report.layers["layer"])
    for page in (
        res.report._repr_html_(),
        res._repr_html_(),
        res.report._repr_mimebundle_()["text/html"],
    ):
        assert "&lt;img src=x onerror=alert(1)&gt;" in page
        assert "<img" not in page and "<b>out" not in page
    path = tmp_path / "report.html"
    res.report.to_html(path)
    written = path.read_text(encoding="utf-8")
    assert "&lt;img" in written and "<img" not in written
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temporary left


def test_to_html_that_fails_leaves_the_previous_file(tmp_path, monkeypatch):
    res = wb.ptq(nn.Sequential(nn.Linear(4, 3)), torch.randn(8, 4), progress=False)
    path = tmp_path / "report.html"
    path.write_text("previous report", encoding="utf-8")

    def write_half_then_fail(self, text, encoding=None):
        with open(self, "w", encoding=encoding) as file:
            file.write(text[: len(text) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(pathlib.Path, "write_text", write_half_then_fail)
    with pytest.raises(wb.ConfigError, match=r"cannot write the report to .*: disk full"):
        res.report.to_html(path)
    monkeypatch.undo()
    assert path.read_text(encoding="utf-8") == "previous report"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]
    assert res.report._repr_mimebundle_()["text/plain"] == res.report.summary_text()
