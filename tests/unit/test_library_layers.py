"""What library code does to layers, and what the workbench must do about it.

* in-place ops (``ReLU(inplace=True)``, ``out += identity``) cannot change what the report
  measured: the same network written in place and out of place gives the same report, and
  each layer's output SQNR matches a measurement taken here with hooks that copy outputs;
* a quantized layer stands in for the module it replaces (forwards that read ``stride``,
  ``padding``, ``out_features`` run), and an attribute neither has is named as such;
* a Linear / Conv subclass with its own forward is kept FP32 with its reason;
* parametrizations (weight norm on any dim, spectral norm, old-style hooks) are resolved on
  the copy: the user's model runs after ``wb.ptq`` and gives the same bits.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

import workbench as wb
from workbench.core.metrics import ErrorAccumulator


class Block(nn.Module):
    def __init__(self, channels: int, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.relu = nn.ReLU(inplace=inplace)

    def forward(self, x):
        identity = x
        out = self.relu(self.conv1(x))
        out = self.conv2(out)
        if self.inplace:
            out += identity
        else:
            out = out + identity
        return self.relu(out)


class ResidualNet(nn.Module):
    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU(inplace=inplace)
        self.block1 = Block(8, inplace)
        self.block2 = Block(8, inplace)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.block2(self.block1(self.relu(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))


def image_batches(n: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(4, 3, 8, 8, generator=generator) for _ in range(n)]


def copied_outputs(model: nn.Module, names: list[str], batches) -> dict[str, list[torch.Tensor]]:
    """Each named layer's outputs on ``batches``, copied when the layer returns them."""
    found: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda m, i, o, k=name: found[k].append(o.detach().clone())
        )
        for name in names
    ]
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for handle in handles:
        handle.remove()
    return found


def sqnr_db(reference: list[torch.Tensor], measured: list[torch.Tensor]) -> float:
    signal = sum(float(r.double().pow(2).sum()) for r in reference)
    noise = sum(
        float((r.double() - m.double()).pow(2).sum())
        for r, m in zip(reference, measured, strict=True)
    )
    return 10 * math.log10(signal / noise)


def test_in_place_ops_do_not_change_the_report():
    torch.manual_seed(0)
    out_of_place = ResidualNet(inplace=False).eval()
    in_place = ResidualNet(inplace=True).eval()
    in_place.load_state_dict(out_of_place.state_dict())
    batches = image_batches()
    res_in = wb.ptq(in_place, batches, config="int8", progress=False)
    res_out = wb.ptq(out_of_place, batches, config="int8", progress=False)
    columns = ["layer", "output_sqnr_db", "output_cosine", "weight_sqnr_db"]
    table_in = res_in.report.layers[columns].set_index("layer")
    table_out = res_out.report.layers[columns].set_index("layer")
    assert table_in.index.tolist() == table_out.index.tolist()
    for column in columns[1:]:
        for name in table_in.index:
            assert table_in.loc[name, column] == pytest.approx(
                table_out.loc[name, column], rel=1e-6, abs=1e-6
            ), (name, column)

    # each layer's reported output SQNR against copies of what the layers returned
    names = [name for name in table_in.index if name in dict(in_place.named_modules())]
    # the quantized model's layers are wrappers named like the originals
    fp32 = copied_outputs(in_place, names, batches)
    quantized = copied_outputs(res_in.model, names, batches)
    for name in names:
        measured = sqnr_db(fp32[name], quantized[name])
        assert table_in.loc[name, "output_sqnr_db"] == pytest.approx(measured, abs=0.01), name
        # the in-place ReLU after the stem and the residual adds would have made these 0-ish
        assert measured > 20, name


class TfPaddedConv(nn.Module):
    """A forward that reads the conv's stride, kernel size and dilation (TF-style "same"
    padding, as transformers' MobileNet and Whisper compute it) and a head that reads
    ``out_features``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        stride, kernel, dilation = self.conv.stride[0], self.conv.kernel_size[0], self.conv.dilation
        pad = max(
            (math.ceil(x.shape[-1] / stride) - 1) * stride
            + (kernel - 1) * dilation[0]
            + 1
            - x.shape[-1],
            0,
        )
        x = F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
        x = self.conv(x).relu().mean(dim=(2, 3))
        assert self.conv.out_channels == self.fc.in_features
        return self.fc(x).reshape(-1, self.fc.out_features)


def test_a_quantized_layer_stands_in_for_the_module_it_replaces(tmp_path):
    torch.manual_seed(0)
    model = TfPaddedConv().eval()
    batches = image_batches()
    res = wb.ptq(model, batches, config="int8", progress=False)
    layers = dict(res.model.named_modules())
    for attribute in ("stride", "padding", "dilation", "groups", "kernel_size", "padding_mode"):
        assert getattr(layers["conv"], attribute) == getattr(model.conv, attribute)
    assert layers["fc"].out_features == 5 and layers["fc"].in_features == 6
    assert torch.equal(layers["conv"].weight, model.conv.weight)
    with torch.no_grad():
        reference, simulated = model(batches[0]), res.model(batches[0])
    acc = ErrorAccumulator()
    acc.add(reference, simulated)
    assert acc.sqnr_db > 25
    path = res.export_onnx(tmp_path / "tf_padded.onnx", batches[0])
    assert path.exists()


class ReadsMissingAttribute(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) * self.fc.temperature  # only after someone set it on the Linear


def test_an_attribute_neither_has_is_named_as_the_wrappers_not_the_datas():
    model = ReadsMissingAttribute().eval()
    model.fc.temperature = 2.0
    batches = [torch.randn(8, 4) for _ in range(2)]
    res = wb.ptq(model, batches, config="int8", progress=False)
    del res.model.fc.layer.temperature
    with pytest.raises(AttributeError) as raised:
        res.model(batches[0])
    message = str(raised.value)
    assert isinstance(raised.value, wb.WorkbenchError)
    assert "'temperature'" in message and "'fc'" in message and "QuantizedLayer" in message
    assert "exclude" in message and "shaped like" not in message
    assert not hasattr(res.model.fc, "temperature")  # still an AttributeError for hasattr


class ChecksItsLayers(nn.Module):
    """A forward that branches on ``isinstance(self.proj, nn.Linear)``: with a stand-in that is
    not a Linear it would take the other path."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = self.proj(x) if isinstance(self.proj, nn.Linear) else x
        return self.head(x)


def test_a_forward_that_checks_a_layers_type_keeps_that_layer_fp32():
    torch.manual_seed(0)
    model = ChecksItsLayers().eval()
    batches = [torch.randn(8, 6) for _ in range(3)]
    res = wb.ptq(model, batches, config="int8", progress=False)
    table = res.report.layers.set_index("layer")
    assert table.loc["proj", "status"] == "fp32"
    assert "isinstance" in table.loc["proj", "reason"]
    assert table.loc["head", "status"] == "quantized"
    assert type(res.model.proj) is nn.Linear
    acc = ErrorAccumulator()
    with torch.no_grad():
        for batch in batches:
            acc.add(model(batch), res.model(batch))
    assert acc.sqnr_db > 30  # skipping proj would be far off


class StdConv2d(nn.Conv2d):
    """timm's weight-standardized conv: the forward convolves with a normalized weight."""

    def forward(self, x):
        w = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, training=True, eps=1e-6
        ).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 0.5


class SpelledLinear(nn.Linear):
    """transformers' FalconLinear: the Linear's computation, spelled out."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


class OwnForwards(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.std = StdConv2d(3, 8, 3)
        self.plain = nn.Conv2d(8, 8, 1)
        self.spelled = SpelledLinear(8, 8)
        self.scaled = ScaledLinear(8, 4)

    def forward(self, x):
        return self.scaled(self.spelled(self.plain(self.std(x)).mean(dim=(2, 3))))


def test_subclasses_with_their_own_forward_are_kept_fp32_with_the_reason():
    torch.manual_seed(0)
    model = OwnForwards().eval()
    batches = image_batches()
    res = wb.ptq(model, batches, config="int8", progress=False)
    table = res.report.layers.set_index("layer")
    for name, base in (("std", "Conv2d"), ("scaled", "Linear")):
        assert table.loc[name, "status"] == "fp32"
        assert "own forward" in table.loc[name, "reason"] and base in table.loc[name, "reason"]
        assert type(res.model.get_submodule(name)) is type(model.get_submodule(name))
    assert table.loc["plain", "status"] == "quantized"
    assert table.loc["spelled", "status"] == "quantized"  # computes what nn.Linear does
    acc = ErrorAccumulator()
    with torch.no_grad():
        for batch in batches:
            acc.add(model(batch), res.model(batch))
    assert acc.sqnr_db > 25  # the base class's forward in their place would be far off


class Parametrized(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Conv1d(8, 8, 3, padding=1, groups=2)
        self.proj = nn.Linear(8, 8)
        self.spec = nn.Linear(8, 8)
        self.old_norm = nn.Linear(8, 8)
        self.old_spec = nn.Linear(8, 4)
        parametrizations.weight_norm(self.pos, name="weight", dim=2)  # as Wav2Vec2 / HuBERT
        parametrizations.weight_norm(self.proj, dim=0)
        parametrizations.spectral_norm(self.spec)
        torch.nn.utils.weight_norm(self.old_norm)
        torch.nn.utils.spectral_norm(self.old_spec)

    def forward(self, x):  # x: [batch, 8, time]
        x = x + self.pos(x)
        x = x.transpose(1, 2)
        return self.old_spec(self.old_norm(self.spec(self.proj(x)).relu()))


def test_parametrizations_are_resolved_on_the_copy_only(tmp_path):
    torch.manual_seed(0)
    model = Parametrized().eval()
    batches = [torch.randn(2, 8, 6) for _ in range(3)]
    with torch.no_grad():
        before = [model(batch) for batch in batches]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    classes = {name: type(m) for name, m in model.named_modules()}
    res = wb.ptq(model, batches, config="int8", progress=False)
    assert set(res.report.layers.query("status == 'quantized'")["layer"]) == {
        "pos",
        "proj",
        "spec",
        "old_norm",
        "old_spec",
    }
    wb.sensitivity(model, batches, progress=False)
    res.export_onnx(tmp_path / "parametrized.onnx", batches[0])
    with torch.no_grad():
        after = [model(batch) for batch in batches]
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b)
    assert {name: type(m) for name, m in model.named_modules()} == classes
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    acc = ErrorAccumulator()
    with torch.no_grad():
        for batch, reference in zip(batches, before, strict=True):
            acc.add(reference, res.model(batch))
    assert acc.sqnr_db > 25


def test_training_only_inputs_stay_out_of_the_exported_model(tmp_path, ort_exact_int8):
    """Hugging Face's convention: batches carry ``labels``, the model returns ``loss`` with
    them. QAT trains on them; the file takes the inference inputs and returns ``logits``."""
    import onnx
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    config = DistilBertConfig(
        vocab_size=64,
        dim=32,
        hidden_dim=64,
        n_layers=1,
        n_heads=2,
        max_position_embeddings=32,
        num_labels=3,
    )
    model = DistilBertForSequenceClassification(config).eval()
    generator = torch.Generator().manual_seed(1)
    batches = [
        {
            "input_ids": torch.randint(0, 64, (4, 12), generator=generator),
            "attention_mask": torch.ones(4, 12, dtype=torch.long),
            "labels": torch.randint(0, 3, (4,), generator=generator),
        }
        for _ in range(2)
    ]
    res = wb.qat(
        model, batches, config="int8", loss_fn=lambda out, b: out.loss, epochs=1, progress=False
    )
    example = {key: value for key, value in batches[0].items() if key != "labels"}
    path = res.export_onnx(tmp_path / "distilbert.onnx", example)
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in graph.output] == ["logits"]
    # an example with labels gives the same file: the labels are dropped
    again = res.export_onnx(tmp_path / "with_labels.onnx", batches[0], check_fusion=False)
    assert [o.name for o in onnx.load(str(again)).graph.output] == ["logits"]
    parity = res.parity(path, batches)  # labels in the data: compared on the logits
    assert parity.table["output"].tolist() == ["logits"]
    assert parity.table["cosine"].iloc[0] > 0.99
    bench = wb.benchmark(res, res, batches[0], runs=1, warmup=0)
    assert len(bench.table) >= 2


class ProjectsATable(nn.Module):
    """DeBERTa-v2's pattern: a Linear applied to a weight table (its input is the same for
    every batch), next to one applied to the model's input."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(5, 8))
        self.pos_proj = nn.Linear(8, 8)
        self.proj = nn.Linear(8, 8)

    def forward(self, x):  # x: [batch, 8]
        return self.proj(x) @ self.pos_proj(self.table).T


def test_a_layer_whose_input_is_computed_from_weights_only_is_kept_fp32():
    torch.manual_seed(0)
    model = ProjectsATable().eval()
    batches = [torch.randn(6, 8) for _ in range(2)]
    table = wb.ptq(model, batches, config="int8", progress=False).report.layers.set_index("layer")
    assert table.loc["proj", "status"] == "quantized"
    assert table.loc["pos_proj", "status"] == "fp32"
    assert "does not depend on the model's inputs" in table.loc["pos_proj", "reason"]


class PoolsItsWholeInput(nn.Module):
    """transformers' EfficientNet pooler: ``AvgPool2d(hidden_dim, ceil_mode=True)``, a window
    larger than the feature map it pools."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.pool = nn.AvgPool2d(16, ceil_mode=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.pool(self.conv(x).relu()).flatten(1))


def test_an_average_pool_window_covering_its_input_matches_onnx_runtime(tmp_path, ort_exact_int8):
    from tests.parity_bounds import assert_parity_within_quantization_error

    torch.manual_seed(0)
    model = PoolsItsWholeInput().eval()
    batches = [torch.randn(4, 3, 6, 6) for _ in range(2)]  # 3x3 maps under a 16x16 window
    res = wb.ptq(model, batches, config=ort_exact_int8, progress=False)
    path = res.export_onnx(tmp_path / "pool.onnx", batches[0], check_fusion=False)
    fusion = res.fusion(path, warn=False)
    assert fusion.all_fused, fusion.ops
    pools = fusion.ops[fusion.ops["kind"] == "average pool"]
    assert pools["kernel"].tolist() == ["QLinearGlobalAveragePool"]
    assert_parity_within_quantization_error(res.parity(path, batches).table.iloc[0])
