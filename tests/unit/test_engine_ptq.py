"""ptq on small models: what it quantizes, with which qparams, against hand-built references;
BN folding; exclusion; unsupported layers; the input model left alone."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import workbench as wb
from workbench.engine.placement.layers import QuantizedLayer


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class ConvBN(nn.Module):
    """Conv-BN-ReLU twice, pooling, Linear head; BN statistics far from the identity."""

    def __init__(self, conv=nn.Conv2d, bn=nn.BatchNorm2d, pool=nn.MaxPool2d) -> None:
        super().__init__()
        self.conv1 = conv(3, 8, 3, padding=1)
        self.bn1 = bn(8)
        self.conv2 = conv(8, 16, 3, padding=1, bias=False)
        self.bn2 = bn(16)
        self.pool = pool(2)
        self.head = nn.Linear(16, 5)
        generator = torch.Generator().manual_seed(0)
        for module in (self.bn1, self.bn2):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
            module.running_var.copy_(torch.rand(n, generator=generator) * 2 + 0.2)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=generator) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.pool(F.relu(self.bn2(self.conv2(x))))
        return self.head(x.mean(dim=tuple(range(2, x.dim()))))


def conv1d_model() -> nn.Module:
    return ConvBN(nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d)


def image_batches(n: int = 4, seed: int = 0, shape=(8, 3, 10, 10)) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(n)]


def mlp_batches(n: int = 4, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 12, generator=generator) * (1 + i) for i in range(n)]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor], training: bool) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert model.training == training
    assert all(m.training == training for m in model.modules())
    for module in model.modules():
        assert not isinstance(module, QuantizedLayer)
        assert not module._forward_hooks and not module._forward_pre_hooks


def asym_qparams(low: float, high: float, levels: int = 256) -> tuple[float, int]:
    """The tutorial's asymmetric formulas, written out in double precision."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / (levels - 1)
    return scale, round(-low / scale)


def test_ptq_mlp_matches_hand_built_reference():
    torch.manual_seed(0)
    model = MLP().eval()
    batches = mlp_batches()
    res = wb.ptq(model, batches, config="int8", progress=False)

    everything = torch.cat(batches)
    q_fc1, q_fc2 = res.model.fc1, res.model.fc2
    # calibration runs FP32 activations through the layers with their weights quantized
    w1 = torch.fake_quantize_per_channel_affine(
        model.fc1.weight,
        q_fc1.weight_quantizer.scale,
        q_fc1.weight_quantizer.zero_point,
        0,
        -128,
        127,
    )
    hidden = torch.relu(F.linear(everything, w1, model.fc1.bias)).detach()
    assert isinstance(q_fc1, QuantizedLayer) and isinstance(q_fc2, QuantizedLayer)
    for layer, data in ((q_fc1, everything), (q_fc2, hidden)):
        scale, zero_point = asym_qparams(float(data.min()), float(data.max()))
        assert float(layer.input_quantizer.scale) == pytest.approx(scale, rel=1e-6)
        assert int(layer.input_quantizer.zero_point) == zero_point
        weight = layer.layer.weight.detach()
        expected_scales = weight.abs().amax(dim=1) / 127
        torch.testing.assert_close(layer.weight_quantizer.scale, expected_scales)

    def reference(x: torch.Tensor) -> torch.Tensor:
        for layer, activation in ((q_fc1, torch.relu), (q_fc2, None)):
            iq, wq = layer.input_quantizer, layer.weight_quantizer
            x = torch.fake_quantize_per_tensor_affine(x, iq.scale, iq.zero_point, 0, 255)
            w = torch.fake_quantize_per_channel_affine(
                layer.layer.weight, wq.scale, wq.zero_point, 0, -128, 127
            )
            x = F.linear(x, w, layer.layer.bias)
            x = activation(x) if activation else x
        return x

    test_x = torch.randn(64, 12, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        got, expected, fp32 = res.model(test_x), reference(test_x), model(test_x)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert not torch.equal(got, fp32)  # it really is quantized
    assert wb.analysis.cosine(fp32, got) > 0.999
    assert list(res.report.layers["layer"]) == ["fc1", "fc2"]
    assert set(res.report.layers["status"]) == {"quantized"}


def test_ptq_cnn_folds_batchnorm():
    model = ConvBN().eval()
    batches = image_batches()
    res = wb.ptq(model, batches, progress=False)
    for x in batches:
        with torch.no_grad():
            torch.testing.assert_close(res.fp32_model(x), model(x), rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in res.fp32_model.modules())
    layers = res.report.layers.set_index("layer")
    assert layers.loc["bn1", "reason"] == "folded into conv1"
    assert layers.loc["bn2", "reason"] == "folded into conv2"
    assert (layers.loc[["bn1", "bn2"], "status"] == "fp32").all()
    assert (layers.loc[["conv1", "conv2", "head"], "status"] == "quantized").all()
    # the folded weights are what gets quantized: per-channel scales of W * gamma / std
    bn = model.bn2
    folded = model.conv2.weight * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).reshape(
        -1, 1, 1, 1
    )
    expected_scales = folded.detach().abs().amax(dim=(1, 2, 3)) / 127
    torch.testing.assert_close(res.model.conv2.weight_quantizer.scale, expected_scales)
    with torch.no_grad():
        x = image_batches(1, seed=5)[0]
        assert wb.analysis.cosine(model(x), res.model(x)) > 0.99


def test_ptq_conv1d_model():
    model = conv1d_model().eval()
    batches = image_batches(shape=(8, 3, 20))
    res = wb.ptq(model, batches, progress=False)
    layers = res.report.layers.set_index("layer")
    assert (layers.loc[["conv1", "conv2", "head"], "type"] == ["Conv1d", "Conv1d", "Linear"]).all()
    assert (layers.loc[["conv1", "conv2", "head"], "status"] == "quantized").all()
    assert layers.loc["bn1", "reason"] == "folded into conv1"
    assert layers.loc["conv2", "num_scales"] == 16
    x = image_batches(1, seed=3, shape=(8, 3, 20))[0]
    with torch.no_grad():
        torch.testing.assert_close(res.fp32_model(x), model(x), rtol=1e-5, atol=1e-5)
        assert wb.analysis.cosine(model(x), res.model(x)) > 0.99


class ReluBetween(nn.Module):
    """conv -> relu -> scale -> bn: the BN does not consume the conv's output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = ConvBN().bn1

    def forward(self, x):
        return self.bn(torch.relu(self.conv(x)) * 2.0)


class Residual(nn.Module):
    """bn(y) + y: the conv's output has a second consumer, so folding would change it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = ConvBN().bn1

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


@pytest.mark.parametrize("model_type", [ReluBetween, Residual])
def test_batchnorm_not_fed_by_the_conv_alone_is_not_folded(model_type):
    torch.manual_seed(0)
    model = model_type().eval()
    batches = image_batches()
    res = wb.ptq(model, batches, progress=False)
    for x in batches:
        with torch.no_grad():
            torch.testing.assert_close(res.fp32_model(x), model(x), rtol=1e-5, atol=1e-5)
    row = res.report.layers.set_index("layer").loc["bn"]
    assert row["status"] == "fp32"
    assert "not folded" in row["reason"]
    assert isinstance(res.fp32_model.bn, nn.BatchNorm2d)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("make_model", [MLP, ConvBN])
def test_input_model_unchanged(make_model, training):
    torch.manual_seed(0)
    model = make_model().train(training)
    batches = mlp_batches() if make_model is MLP else image_batches()
    before = snapshot(model)
    model.eval()
    with torch.no_grad():
        output_before = model(batches[0]).clone()
    model.train(training)
    res = wb.ptq(model, batches, eval_fn=lambda m: 0.0, progress=False)
    assert_unchanged(model, before, training)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(batches[0]), output_before)
    assert res.model is not model and res.fp32_model is not model
    # PTQ reads the user's tensors instead of copying them; the step that changes some (BN
    # folding into the convs) gives the copy its own tensors first: the model stayed as it was
    user = {id(p) for p in model.parameters()}
    shared = [p for p in res.model.parameters() if id(p) in user]
    assert shared
    if make_model is ConvBN:
        assert len(shared) < len(user)


def _modes(model: nn.Module) -> list[bool]:
    return [module.training for module in model.modules()]


@pytest.mark.parametrize("workflow", ["ptq", "qat", "sensitivity", "auto_mixed_precision"])
def test_eval_fn_switching_to_eval_leaves_every_module_mode_as_it_was(workflow):
    """An eval_fn that calls model.eval() (as most do) on a model whose parts are in different
    modes: afterwards every submodule is in its own mode again, not all in the top one's."""
    torch.manual_seed(0)
    model = MLP().train()
    model.fc2.eval()
    before = _modes(model)
    batches = mlp_batches(2)

    def eval_fn(m: nn.Module) -> float:
        m.eval()
        with torch.no_grad():
            return -float(m(batches[0]).pow(2).mean())

    if workflow == "ptq":
        wb.ptq(model, batches, eval_fn=eval_fn, progress=False)
    elif workflow == "qat":
        data = [(x, torch.zeros(len(x), dtype=torch.long)) for x in batches]
        wb.qat(model, data, loss_fn=nn.CrossEntropyLoss(), eval_fn=eval_fn, progress=False)
    elif workflow == "sensitivity":
        wb.sensitivity(model, batches, eval_fn=eval_fn, progress=False)
    else:
        wb.auto_mixed_precision(model, batches, eval_fn, max_drop=0.0, progress=False)
    assert _modes(model) == before


class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(12, 16)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"proj": nn.Linear(16, 16), "gate": nn.Linear(16, 16)}) for _ in range(3)
        )
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = x + block["proj"](x) * torch.sigmoid(block["gate"](x))
        return self.out(x)


def test_exclude_by_name_and_glob_keeps_fp32_with_reason():
    torch.manual_seed(0)
    model = Blocks().eval()
    config = wb.QuantConfig.preset("int8", exclude=("stem", "blocks.*.gate"))
    res = wb.ptq(model, mlp_batches(), config=config, progress=False)
    layers = res.report.layers.set_index("layer")
    excluded = ["stem", "blocks.0.gate", "blocks.1.gate", "blocks.2.gate"]
    quantized = ["blocks.0.proj", "blocks.1.proj", "blocks.2.proj", "out"]
    assert (layers.loc[excluded, "status"] == "fp32").all()
    assert (layers.loc[excluded, "reason"] == "excluded by config").all()
    assert (layers.loc[excluded, "scheme"] == "fp32").all()
    assert (layers.loc[quantized, "status"] == "quantized").all()
    for name in excluded:
        module = res.model.get_submodule(name)
        assert type(module) is nn.Linear
        assert torch.equal(module.weight, model.get_submodule(name).weight)
    for name in quantized:
        assert isinstance(res.model.get_submodule(name), QuantizedLayer)
    storage = res.report.storage.set_index("layer")
    assert storage.loc["stem", "total_bytes"] == storage.loc["stem", "fp32_bytes"] == 4 * 208


class WithUnsupported(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, input_ids):
        return self.fc(self.norm(self.embed(input_ids)))


def test_unsupported_layers_reported_fp32_with_reason():
    torch.manual_seed(0)
    model = WithUnsupported().eval()
    batches = [torch.randint(0, 50, (4, 7)) for _ in range(3)]
    res = wb.ptq(model, batches, progress=False)
    layers = res.report.layers.set_index("layer")
    assert layers.loc["embed", "status"] == "fp32"
    assert "Embedding is not a quantized layer type" in layers.loc["embed", "reason"]
    assert layers.loc["norm", "status"] == "fp32"
    assert "LayerNorm" in layers.loc["norm", "reason"]
    assert layers.loc["fc", "status"] == "quantized"
    assert type(res.model.embed) is nn.Embedding and type(res.model.norm) is nn.LayerNorm
    storage = res.report.storage.set_index("layer")
    assert storage.loc["embed", "total_bytes"] == 50 * 16 * 4
    assert storage.loc["norm", "total_bytes"] == 2 * 16 * 4


class KeywordModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 4)

    def forward(self, features, mask=None):
        if mask is not None:
            features = features * mask
        return self.fc(features)


def expected_input_scale(tensors: list[torch.Tensor]) -> float:
    everything = torch.cat([t.reshape(-1) for t in tensors])
    return asym_qparams(float(everything.min()), float(everything.max()))[0]


def calib_variants():
    xs = mlp_batches(3)
    ys = [torch.randint(0, 4, (16,)) for _ in xs]
    dataset = TensorDataset(torch.cat(xs), torch.cat(ys))
    return {
        "dataloader": (DataLoader(dataset, batch_size=16), xs),
        "list_of_tensors": (xs, xs),
        "list_of_tuples": (list(zip(xs, ys, strict=True)), xs),
        "list_of_lists": ([[x, y] for x, y in zip(xs, ys, strict=True)], xs),
        "generator": ((x for x in xs), xs),
        "single_tensor": (torch.cat(xs), xs),
    }


@pytest.mark.parametrize("kind", list(calib_variants()))
def test_calib_data_forms(kind):
    torch.manual_seed(0)
    data, tensors = calib_variants()[kind]
    res = wb.ptq(MLP().eval(), data, progress=False)
    scale = float(res.model.fc1.input_quantizer.scale)
    assert scale == pytest.approx(expected_input_scale(tensors), rel=1e-6)


def test_calib_data_dicts_of_keyword_inputs():
    torch.manual_seed(0)
    xs = mlp_batches(3)
    masks = [(torch.rand(16, 12) > 0.5).float() for _ in xs]
    batches = [{"features": x, "mask": m} for x, m in zip(xs, masks, strict=True)]
    res = wb.ptq(KeywordModel().eval(), batches, progress=False)
    masked = [x * m for x, m in zip(xs, masks, strict=True)]
    scale = float(res.model.fc.input_quantizer.scale)
    assert scale == pytest.approx(expected_input_scale(masked), rel=1e-6)
    # (dict, labels) tuples too, and a DataLoader over dicts
    labelled = [(b, torch.zeros(16)) for b in batches]
    res = wb.ptq(KeywordModel().eval(), labelled, progress=False)
    assert float(res.model.fc.input_quantizer.scale) == pytest.approx(scale, rel=1e-6)


def test_num_batches_limits_calibration():
    torch.manual_seed(0)
    xs = mlp_batches(4)  # later batches have a wider range
    res = wb.ptq(MLP().eval(), xs, num_batches=2, progress=False)
    scale = float(res.model.fc1.input_quantizer.scale)
    assert scale == pytest.approx(expected_input_scale(xs[:2]), rel=1e-6)


def test_progress_bar_only_when_asked(capsys):
    wb.ptq(MLP().eval(), mlp_batches(2), progress=False)
    assert "calibrating" not in capsys.readouterr().err
    wb.ptq(MLP().eval(), mlp_batches(2), progress=True)
    assert "calibrating" in capsys.readouterr().err


def test_layer_never_reached_is_kept_fp32():
    class Unused(MLP):
        def __init__(self):
            super().__init__()
            self.spare = nn.Linear(4, 4)

    torch.manual_seed(0)
    res = wb.ptq(Unused().eval(), mlp_batches(2), progress=False)
    row = res.report.layers.set_index("layer").loc["spare"]
    assert row["status"] == "fp32" and row["reason"] == "never called on the calibration data"
    assert type(res.model.spare) is nn.Linear


def test_quantized_model_is_deterministic_and_copyable():
    torch.manual_seed(0)
    res = wb.ptq(ConvBN().eval(), image_batches(), progress=False)
    x = image_batches(1, seed=4)[0]
    clone = copy.deepcopy(res.model)
    with torch.no_grad():
        assert torch.equal(res.model(x), res.model(x))
        assert torch.equal(clone(x), res.model(x))


def test_calibration_streams_batches_without_keeping_them():
    import gc
    import weakref

    torch.manual_seed(0)
    seen: list[weakref.ref] = []
    alive_while_streaming: list[int] = []

    def stream():
        generator = torch.Generator().manual_seed(1)
        for i in range(40):
            if i >= 20:
                gc.collect()
                alive_while_streaming.append(sum(ref() is not None for ref in seen))
            batch = torch.randn(16, 12, generator=generator) * (3.0 if i == 30 else 1.0)
            seen.append(weakref.ref(batch))
            yield batch

    res = wb.ptq(MLP().eval(), stream(), progress=False)
    assert len(seen) == 40
    # the first 8 batches (kept for the report) and the one being calibrated, not all 40
    assert max(alive_while_streaming) <= 10
    # batch 30 (3x wider) was calibrated on all the same
    generator = torch.Generator().manual_seed(1)
    everything = [
        torch.randn(16, 12, generator=generator) * (3.0 if i == 30 else 1.0) for i in range(40)
    ]
    scale = float(res.model.fc1.input_quantizer.scale)
    assert scale == pytest.approx(expected_input_scale(everything), rel=1e-6)


def test_progress_bar_counts_the_batches(capsys):
    data = DataLoader(TensorDataset(torch.randn(50, 12)), batch_size=5)
    wb.ptq(MLP().eval(), data, progress=True)
    assert "10/10" in capsys.readouterr().err
    wb.ptq(MLP().eval(), data, num_batches=4, progress=True)
    assert "4/4" in capsys.readouterr().err
