"""wb.qat end to end on small models: errors before training, interruption, history, report."""

from __future__ import annotations

import functools
import subprocess
import sys

import pytest
import torch
from torch import nn

import workbench as wb
from workbench.engine.quantizers.modules import ActivationQuantizer, WeightQuantizer


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.relu(self.bn(self.conv(x)))))


class KeywordNet(nn.Module):
    """Takes keyword inputs, as a transformers model does."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(8, 16)
        self.relu = nn.ReLU()
        self.head = nn.Linear(16, 3)

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None):
        return self.head(self.relu(self.hidden(features)))


def small_net(seed: int = 0) -> SmallNet:
    torch.manual_seed(seed)
    net = SmallNet()
    net.train()
    for _ in range(5):
        net(torch.randn(16, 1, 6, 6))
    return net.eval()


def labelled_batches(count: int = 6, seed: int = 0):
    """Batches of a learnable task: the label is which third of the image is brightest."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        x = torch.randn(16, 1, 6, 6, generator=generator)
        y = torch.randint(0, 3, (16,), generator=generator)
        for i in range(16):
            x[i, 0, 2 * int(y[i]) : 2 * int(y[i]) + 2] += 2.0
        out.append((x, y))
    return out


class StepCounter:
    """An optimizer factory that counts optimizer steps (to prove none was taken)."""

    def __init__(self) -> None:
        self.steps = 0
        self.created = 0

    def __call__(self, params, lr):
        self.created += 1
        optimizer = torch.optim.Adam(params, lr=lr)
        original_step = optimizer.step

        def step(*args, **kwargs):
            self.steps += 1
            return original_step(*args, **kwargs)

        optimizer.step = step
        return optimizer


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == state.keys()
    for key, value in state.items():
        torch.testing.assert_close(now[key], value, rtol=0, atol=0)


CE = nn.CrossEntropyLoss()


@pytest.mark.parametrize(
    ("overrides", "error", "words"),
    [
        ({"loss_fn": nn.CrossEntropyLoss(reduction="none")}, wb.ConfigError, "shape [16]"),
        ({"loss_fn": lambda out, y: CE(out, y).item()}, wb.ConfigError, "not a tensor"),
        ({"loss_fn": lambda out, y: CE(out.detach(), y)}, wb.ConfigError, "no gradient"),
        ({"loss_fn": None}, wb.ConfigError, "loss_fn"),
        ({"train_data": []}, wb.CalibrationError, "yielded 0 batches"),
        ({"train_data": iter(())}, wb.CalibrationError, "yielded 0 batches"),
        ({"train_data": torch.randn(4, 1, 6, 6)}, wb.CalibrationError, "no targets"),
        ({"train_data": [torch.randn(4, 1, 6, 6)]}, wb.CalibrationError, "(inputs, targets)"),
        ({"lr": 0.0}, wb.ConfigError, "lr must be"),
        ({"lr": -1e-3}, wb.ConfigError, "lr must be"),
        ({"epochs": 0}, wb.ConfigError, "epochs must be"),
        ({"epochs": 1.5}, wb.ConfigError, "epochs must be"),
        ({"freeze_bn_after": -1}, wb.ConfigError, "freeze_bn_after"),
        ({"device": "no-such-device"}, wb.ConfigError, "unknown device"),
    ],
)
def test_bad_input_fails_before_any_training_step(overrides, error, words):
    net = small_net()
    state = state_of(net)
    counter = StepCounter()
    arguments = {"train_data": labelled_batches(), "loss_fn": CE, "optimizer": counter}
    arguments |= overrides
    with pytest.raises(error) as info:
        wb.qat(net, progress=False, **arguments)
    assert words in str(info.value)
    assert counter.steps == 0
    assert_same_state(net, state)


def test_optimizer_instance_is_refused_with_the_fix():
    net = small_net()
    with pytest.raises(wb.ConfigError, match=r"functools\.partial"):
        wb.qat(
            net, labelled_batches(), loss_fn=CE, optimizer=torch.optim.SGD(net.parameters(), 0.1)
        )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(wb.ConfigError, match=r"CUDA is not available.*device='cpu'"):
        wb.qat(small_net(), labelled_batches(), loss_fn=CE, device="cuda", progress=False)


def test_keyboard_interrupt_returns_the_steps_done_with_a_warning():
    net = small_net()
    state = state_of(net)
    calls = {"n": 0}
    training_calls = []

    def loss_fn(output, target):
        calls["n"] += 1
        if calls["n"] > 1:  # the first call is the check of the loss, before training
            training_calls.append(calls["n"])
            if len(training_calls) == 3:
                raise KeyboardInterrupt
        return CE(output, target)

    with pytest.warns(RuntimeWarning, match="interrupted after 2 step"):
        result = wb.qat(net, labelled_batches(), loss_fn=loss_fn, epochs=3, lr=1e-3, progress=False)
    assert result.method == "qat"
    assert list(result.history["step"]) == [1, 2]
    assert result.extras["interrupted"] and result.report.summary["qat_interrupted"]
    assert result.report.summary["qat_epochs_completed"] == 0
    assert_same_state(net, state)
    out = result.model(labelled_batches(1)[0][0])  # a usable, quantized model
    assert out.shape == (16, 3) and torch.isfinite(out).all()


def test_qat_trains_a_copy_and_records_every_step():
    net = small_net()
    net.train()  # the user's mode is restored, whatever it was
    state = state_of(net)
    data = labelled_batches(6)
    test_x = torch.cat([x for x, _ in data])
    test_y = torch.cat([y for _, y in data])
    metrics = []

    def eval_fn(model):
        model.eval()
        with torch.no_grad():
            accuracy = (model(test_x).argmax(1) == test_y).float().mean()
        metrics.append(float(accuracy))
        return float(accuracy)

    result = wb.qat(net, data, loss_fn=CE, epochs=3, lr=3e-3, eval_fn=eval_fn, progress=False)
    assert net.training
    assert_same_state(net, state)
    history = result.history
    assert list(history.columns[:4]) == ["step", "epoch", "loss", "metric"]
    assert list(history["step"]) == list(range(1, 19))
    assert list(history["epoch"]) == [1] * 6 + [2] * 6 + [3] * 6
    assert history["metric"].notna().sum() == 3
    assert list(history["metric"].dropna()) == metrics[:3]
    assert list(result.report.epochs["mean_loss"]) == pytest.approx(
        list(history.groupby("epoch")["loss"].mean())
    )
    assert history["loss"].iloc[-6:].mean() < history["loss"].iloc[:6].mean()
    assert result.method == "qat" and result.history is history


def test_trained_weights_keep_their_qparams_and_the_storage_of_ptq():
    net = small_net()
    data = labelled_batches()
    result = wb.qat(net, data, loss_fn=CE, epochs=2, lr=1e-2, progress=False)
    ptq = wb.ptq(net, data, progress=False)
    conv = result.model.conv
    assert not torch.allclose(conv.layer.weight, ptq.model.conv.layer.weight)  # it trained
    # qparams were frozen from the final weight: per-channel max|w| / 127
    expected = conv.layer.weight.detach().abs().amax(dim=(1, 2, 3)) / 127
    torch.testing.assert_close(conv.weight_quantizer.scale, expected)
    row = result.report.layers.set_index("layer").loc["conv"]
    assert row["scale_max"] == pytest.approx(float(expected.max()))
    assert list(result.report.layers.columns) == list(ptq.report.layers.columns)
    assert result.report.storage.equals(ptq.report.storage)


def test_learned_scales_are_recorded_and_kept_as_fixed_buffers():
    net = small_net()
    result = wb.qat(
        net, labelled_batches(), loss_fn=CE, epochs=2, lr=3e-3, learn_scales=True, progress=False
    )
    history = result.history
    scale_columns = [c for c in history.columns if c.endswith("]")]
    assert "weight_scale[conv]" in scale_columns and "weight_scale[fc]" in scale_columns
    assert "act_scale[input of conv]" in scale_columns
    moved = history[scale_columns].iloc[-1] != history[scale_columns].iloc[0]
    assert moved.all()
    for module in result.model.modules():
        if isinstance(module, WeightQuantizer | ActivationQuantizer):
            assert not module.learn_scale
            assert "scale" in dict(module.named_buffers())
            assert float(module.scale.min()) > 0
    final = float(result.model.conv.weight_quantizer.scale.mean())
    assert final == pytest.approx(history["weight_scale[conv]"].iloc[-1], rel=1e-6)


def test_dict_batches_call_loss_fn_with_the_whole_batch():
    torch.manual_seed(0)
    net = KeywordNet().eval()
    generator = torch.Generator().manual_seed(1)
    data = []
    for _ in range(5):
        features = torch.randn(16, 8, generator=generator)
        data.append({"features": features, "labels": (features[:, 0] > 0).long()})
    seen = []

    def loss_fn(output, batch):
        seen.append(batch)
        return CE(output, batch["labels"])

    result = wb.qat(net, data, loss_fn=loss_fn, epochs=2, lr=1e-2, progress=False)
    assert len(result.history) == 10
    assert seen[-1] is data[-1]
    assert result.history["loss"].iloc[-5:].mean() < result.history["loss"].iloc[:5].mean()


def test_a_generator_feeds_one_epoch_including_its_calibration_batches():
    net = small_net()
    data = labelled_batches(10)
    result = wb.qat(net, (b for b in data), loss_fn=CE, lr=1e-3, progress=False)
    assert len(result.history) == 10
    with pytest.raises(wb.ConfigError, match="one-shot iterator"):
        wb.qat(net, (b for b in data), loss_fn=CE, epochs=2, progress=False)


def test_separate_calib_data_and_optimizer_factory():
    net = small_net()
    counter = StepCounter()
    calib = [x for x, _ in labelled_batches(2, seed=5)]
    result = wb.qat(
        net, labelled_batches(4), loss_fn=CE, optimizer=counter, calib_data=calib, progress=False
    )
    assert counter.created == 1 and counter.steps == 4
    sgd = functools.partial(torch.optim.SGD, momentum=0.9)
    result = wb.qat(net, labelled_batches(4), loss_fn=CE, optimizer=sgd, lr=1e-2, progress=False)
    assert len(result.history) == 4


def test_nan_loss_stops_with_the_fix():
    net = small_net()
    calls = {"n": 0}

    def loss_fn(output, target):
        calls["n"] += 1
        loss = CE(output, target)
        return loss * float("nan") if calls["n"] == 4 else loss

    with pytest.raises(wb.NonFiniteError, match=r"step 3.*lower lr"):
        wb.qat(net, labelled_batches(), loss_fn=loss_fn, progress=False)


def test_training_figures():
    net = small_net()
    data = labelled_batches()
    result = wb.qat(
        net,
        data,
        loss_fn=CE,
        epochs=2,
        lr=3e-3,
        learn_scales=True,
        progress=False,
        eval_fn=lambda m: 0.5,
    )
    fig = result.report.plot_training()
    loss_ax, metric_ax = fig.axes
    assert len(loss_ax.lines[0].get_xdata()) == 12
    assert list(metric_ax.lines[0].get_ydata()) == [0.5, 0.5]
    scales = result.report.plot_scales()
    columns = [c for c in result.history.columns if c.endswith("]")]
    assert len(scales.axes[0].lines) == len(columns) + 1  # and the reference line at 1
    plain = wb.qat(net, data, loss_fn=CE, progress=False)
    with pytest.raises(ValueError, match="learn_scales=True"):
        plain.report.plot_scales()
    assert "Training (per epoch)" in result.report._repr_html_()
    assert "QAT: 12 steps, 2 epoch(s) completed" in repr(result)


def test_qat_imports_matplotlib_only_for_figures():
    code = (
        "import sys, torch, workbench as wb\n"
        "from torch import nn\n"
        "net = nn.Sequential(nn.Linear(4, 3))\n"
        "data = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(3)]\n"
        "wb.qat(net, data, loss_fn=nn.CrossEntropyLoss(), progress=False)\n"
        "assert 'matplotlib' not in sys.modules, 'imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_qat_report_json_follows_the_report_schema():
    import jsonschema

    from workbench.analysis.report_json import report_schema

    result = wb.qat(
        small_net(),
        labelled_batches(),
        loss_fn=CE,
        epochs=2,
        lr=1e-3,
        progress=False,
        eval_fn=lambda m: 0.25,
    )
    bundle = result.report.to_json()
    jsonschema.Draft202012Validator(report_schema()).validate(bundle)
    assert bundle["summary"]["qat_steps"] == 12
    epochs = result.report.epochs
    assert list(epochs["mean_loss"]) == pytest.approx(
        list(result.history.groupby("epoch")["loss"].mean())
    )
    assert list(epochs["metric"]) == [0.25, 0.25]
