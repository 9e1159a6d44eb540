"""The second sweep of careless-but-realistic inputs (none of them in test_bad_input_sweep.py).

Each case builds its own tiny model and data and names what it expects: a ``WorkbenchError``
subclass in one line matching a pattern, or success (then the case's call checks the
behaviour itself). For every case the user's model and data are compared before / after
(tests/unit/model_guard.py) and the working directory and the temporary directory hold
exactly the files the case says it writes (none for a failure).

The classes covered: silently wrong results (the FP32 file written over the INT8 one, a run
without a metric marked Pareto-optimal), raw errors (nn.EmbeddingBag's export, lazy modules,
misspelled keywords, missing report folders), errors naming the wrong fix (float64, TorchScript,
embeddings-only models, the opset, ``(X, y)`` data), process state (threads exporting at once,
``sys.stdout`` and file descriptor 1), leftovers of failed calls, file modes and the umask,
and override patterns naming quantizer sites.
"""

from __future__ import annotations

import os
import stat
import sys
import threading
from pathlib import Path
from unittest import mock

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch
from bad_input_cases import SUCCEEDS, Cases, check_case
from torch import nn

import workbench as wb
from tests.parity_bounds import FLOAT32_ULPS, assert_within_quantization_error

CASES = Cases()
case = CASES.case


# models and data ---------------------------------------------------------------------------------
def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def rows(n: int = 2) -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(5, 4) for _ in range(n)]


class Bag(nn.Module):
    """A bag-of-words classifier: nn.EmbeddingBag exports as an ONNX Loop with a body that
    reads values of the outer graph."""

    def __init__(self, mode: str = "mean") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bag = nn.EmbeddingBag(20, 8, mode=mode)
        self.fc = nn.Linear(8, 3)

    def forward(self, ids):
        return self.fc(self.bag(ids))


class Embeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 8)

    def forward(self, ids):
        return self.embed(ids)


def ids(n: int = 2) -> list[torch.Tensor]:
    torch.manual_seed(3)
    return [torch.randint(0, 20, (4, 5)) for _ in range(n)]


def ptq(model, data, **kwargs):
    return lambda: wb.ptq(model, data, progress=False, **kwargs)


def quantized(model=None, data=None):
    model = mlp() if model is None else model
    data = rows() if data is None else data
    return model, data, wb.ptq(model, data, progress=False)


def ort_output(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def umask_set(mask: int):
    """A context in which the process umask is ``mask``."""
    import contextlib

    @contextlib.contextmanager
    def context():
        old = os.umask(mask)
        try:
            yield
        finally:
            os.umask(old)

    return context()


# silently wrong ----------------------------------------------------------------------------------
@case(wb.ConfigError, "same file as path")
def case_export_fp32_path_is_the_int8_path(tmp):
    model, data, result = quantized()
    return model, data, lambda: result.export_onnx("m.onnx", data[0], fp32_path="m.onnx")


@case(wb.ConfigError, "same file as path")
def case_export_fp32_path_is_the_int8_path_spelled_otherwise(tmp):
    model, data, result = quantized()
    return model, data, lambda: result.export_onnx("m.onnx", data[0], fp32_path=tmp / "m.onnx")


@case(wb.ConfigError, "same file as path", writes=("m.onnx",))
def case_export_fp32_path_is_an_existing_int8_file(tmp):
    model, data, result = quantized()
    result.export_onnx("m.onnx", data[0], check_fusion=False)
    before = Path("m.onnx").read_bytes()

    def call():
        try:
            result.export_onnx("m.onnx", data[0], fp32_path="./m.onnx")
        finally:
            assert Path("m.onnx").read_bytes() == before  # the INT8 file stays as it was

    return model, data, call


@case(SUCCEEDS)
def case_pareto_run_without_a_metric(tmp):
    runs = {
        "no metric": {"metric": None, "size_bytes": 10},
        "measured": {"metric": 0.9, "size_bytes": 100},
    }

    def call():
        table = wb.pareto_table(runs).set_index("run")
        assert table.loc["no metric", "pareto_optimal"] == False  # noqa: E712 (numpy bool)
        assert table.loc["measured", "pareto_optimal"] == True  # noqa: E712

    return None, runs, call


@case(SUCCEEDS)
def case_pareto_every_run_without_a_metric(tmp):
    runs = [{"run": "a", "metric": float("nan"), "size_bytes": 1}, {"run": "b", "size_bytes": 2}]

    def call():
        assert not wb.pareto_table(runs)["pareto_optimal"].any()

    return None, runs, call


# raw or internal errors --------------------------------------------------------------------------
@case(SUCCEEDS, writes=("bag.onnx",))
def case_embedding_bag_exports_and_runs(tmp):
    model, data = Bag().eval(), ids()

    def call():
        result = wb.ptq(model, data, progress=False)
        path = result.export_onnx("bag.onnx", data[0], check_fusion=False)
        with torch.no_grad():
            simulated = result.model(data[0]).numpy()
        # the bag is FP32 and fc's input quantizer rounds the same values: one step at most
        step = float(result.model.fc.input_quantizer.scale)
        weight = float(result.model.fc.layer.weight.detach().abs().sum(dim=1).max())
        assert np.abs(ort_output(path, data[0]) - simulated).max() <= step * weight

    return model, data, call


@case(SUCCEEDS, writes=("bag.onnx", "bag_fp32.onnx"))
def case_embedding_bag_sum_exports_with_its_fp32_model(tmp):
    model, data = Bag("sum").eval(), ids()

    def call():
        result = wb.ptq(model, data, progress=False)
        result.export_onnx("bag.onnx", data[0], fp32_path="bag_fp32.onnx", check_fusion=False)
        with torch.no_grad():
            expected = model(data[0]).numpy()
        # the same FP32 function: float32 rounding in another summation order only
        scale = FLOAT32_ULPS * float(np.abs(expected).max())
        assert np.allclose(ort_output(Path("bag_fp32.onnx"), data[0]), expected, 0, scale)

    return model, data, call


def lazy_case(model, data):
    """The guard cannot copy unmaterialized parameters: the call checks they stay so."""

    def call():
        try:
            wb.ptq(model, data, progress=False)
        finally:
            assert any(nn.parameter.is_lazy(p) for p in model.parameters())

    return None, data, call


@case(wb.ModelError, r"'0\.weight' .*not materialized.*model\(example_batch\)")
def case_lazy_linear_not_materialized(tmp):
    return lazy_case(nn.Sequential(nn.LazyLinear(3)), rows())


@case(wb.ModelError, "not materialized")
def case_lazy_conv_not_materialized(tmp):
    model = nn.Sequential(nn.LazyConv2d(4, 3), nn.Flatten(), nn.LazyLinear(2))
    return lazy_case(model, [torch.randn(2, 1, 6, 6)])


@case(SUCCEEDS)
def case_lazy_linear_materialized_first(tmp):
    model = nn.Sequential(nn.LazyLinear(3))
    data = rows()
    model(data[0])
    return model, data, ptq(model, data)


@case(wb.ConfigError, r"unknown keyword 'per_chanel'.*'per_channel' is a Scheme setting")
def case_preset_misspelled_per_channel(tmp):
    return None, None, lambda: wb.QuantConfig.preset("int8", per_chanel=False)


@case(wb.ConfigError, r"unknown keyword 'observr'; did you mean 'observer'")
def case_preset_misspelled_observer(tmp):
    return None, None, lambda: wb.QuantConfig.preset("int8", observr="mse")


@case(wb.ConfigError, r"unknown keyword 'bits'.*Scheme setting")
def case_preset_bits_keyword(tmp):
    return None, None, lambda: wb.QuantConfig.preset("int8", bits=4)


@case(SUCCEEDS, writes=("reports", "reports/run1", "reports/run1/report.html"))
def case_report_into_a_missing_folder(tmp):
    model, data, result = quantized()

    def call():
        result.report.to_html("reports/run1/report.html")
        assert "<html" in Path("reports/run1/report.html").read_text().lower()

    return model, data, call


@case(wb.ConfigError, "cannot write the report to 'taken/report.html'", writes=("taken",))
def case_report_under_a_file(tmp):
    model, data, result = quantized()
    Path("taken").write_text("a file, not a folder")
    return model, data, lambda: result.report.to_html("taken/report.html")


@case(wb.ConfigError, "cannot write the report", writes=())
def case_report_write_fails_in_a_new_folder(tmp):
    model, data, result = quantized()

    def call():
        with mock.patch.object(Path, "write_text", side_effect=OSError(28, "No space left")):
            result.report.to_html("new/deeper/report.html")

    return model, data, call  # and no folder "new" left behind


# errors that named the wrong fix -----------------------------------------------------------------
@case(wb.ModelError, r"float64.*model\.float\(\) and float32 data")
def case_float64_model_and_data(tmp):
    model = mlp().double()
    data = [x.double() for x in rows()]
    return model, data, ptq(model, data)


@case(wb.CalibrationError, r"float64 and the model float32.*x\.float\(\)")
def case_float64_data_for_a_float32_model(tmp):
    data = [x.double() for x in rows()]
    return mlp(), data, ptq(mlp(), data)


@case(wb.ModelError, "TorchScript module.*pass the original nn.Module")
def case_jit_script_model(tmp):
    model = torch.jit.script(mlp())
    return None, rows(), ptq(model, rows())


@case(wb.ModelError, "TorchScript module.*pass the original nn.Module")
def case_jit_trace_model(tmp):
    model = torch.jit.trace(mlp(), rows()[0])
    return None, rows(), ptq(model, rows())


@case(wb.ModelError, r"quantize_embeddings=True")
def case_embeddings_only_model(tmp):
    return Embeddings().eval(), ids(), ptq(Embeddings().eval(), ids())


@case(SUCCEEDS)
def case_embeddings_only_model_with_quantize_embeddings(tmp):
    model, data = Embeddings().eval(), ids()
    config = wb.QuantConfig.preset("int8", quantize_embeddings=True)
    return model, data, ptq(model, data, config=config)


@case(wb.ConfigError, r"opset 170 is above 20.*from 13 to 20")
def case_opset_far_too_high(tmp):
    model, data, result = quantized()
    return model, data, lambda: result.export_onnx("m.onnx", data[0], opset=170)


@case(wb.ConfigError, r"opset 21 is above 20")
def case_opset_just_too_high(tmp):
    model, data, result = quantized()
    return model, data, lambda: result.export_fp32_onnx("m.onnx", data[0], opset=21)


@case(SUCCEEDS)
def case_ptq_on_inputs_and_targets(tmp):
    torch.manual_seed(4)
    model, data = mlp(), (torch.randn(32, 4), torch.randint(0, 3, (32,)))

    def call():
        result = wb.ptq(model, data, progress=False)
        # one batch of the 32 inputs, the targets unused: the input scale covers exactly X
        scale = float(result.model[0].input_quantizer.scale)
        low, high = min(float(data[0].min()), 0.0), max(float(data[0].max()), 0.0)
        assert scale == pytest.approx((high - low) / 255, rel=1e-6)
        assert result.report.summary["layer_errors_batches"] == 1

    return model, data, call


@case(SUCCEEDS)
def case_ptq_on_token_ids_and_labels(tmp):
    model, data = Bag().eval(), (torch.randint(0, 20, (6, 5)), torch.randint(0, 3, (6,)))
    return model, data, ptq(model, data)


@case(wb.CalibrationError, r"one \(inputs, targets\) pair.*DataLoader\(TensorDataset\(X, y\)")
def case_qat_on_inputs_and_targets(tmp):
    model, data = mlp(), (torch.randn(32, 4), torch.randint(0, 3, (32,)))
    loss = nn.CrossEntropyLoss()
    return model, data, lambda: wb.qat(model, data, loss_fn=loss, progress=False)


# process state -----------------------------------------------------------------------------------
@case(SUCCEEDS, writes=tuple(f"t{i}.onnx" for i in range(4)))
def case_threads_exporting_at_once(tmp):
    model, data, result = quantized()

    def call():
        stdout, fd1 = sys.stdout, os.fstat(1)
        errors: list[BaseException] = []

        def export(index: int) -> None:
            try:
                result.export_onnx(f"t{index}.onnx", data[0], check_fusion=False)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=export, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert sys.stdout is stdout
        after = os.fstat(1)
        assert (after.st_dev, after.st_ino) == (fd1.st_dev, fd1.st_ino)
        with torch.no_grad():
            simulated = result.model(data[0]).numpy()
            fp32 = result.fp32_model(data[0]).numpy()
        for index in range(4):  # each file whole: ONNX Runtime computes the simulation
            onnx_out = ort_output(Path(f"t{index}.onnx"), data[0])
            assert_within_quantization_error(onnx_out, simulated, fp32)

    return model, data, call


class _Unexportable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return torch.fft.rfft(self.fc(x)).abs()  # no ONNX export for fft_rfft


@case(wb.ExportError)
def case_failed_export_restores_stdout(tmp):
    model = _Unexportable().eval()
    data = rows()
    result = wb.ptq(model, data, progress=False)

    def call():
        stdout, fd1 = sys.stdout, os.fstat(1)
        try:
            result.export_onnx("never.onnx", data[0])
        finally:
            assert sys.stdout is stdout
            assert os.fstat(1).st_ino == fd1.st_ino

    return model, data, call


# leftovers ---------------------------------------------------------------------------------------
@case(wb.ConfigError, "fp32_path 'folder' is a directory", writes=("folder",))
def case_export_fp32_path_is_a_folder(tmp):
    model, data, result = quantized()
    Path("folder").mkdir()
    return model, data, lambda: result.export_onnx("m.onnx", data[0], fp32_path="folder")


@case(wb.ExportError, "the FP32 exporter failed")
def case_failed_fp32_export_removes_the_int8_file(tmp):
    model, data, result = quantized()

    def call():
        failing = mock.patch(
            "workbench.runtime.onnx_export.export_fp32_onnx",
            side_effect=wb.ExportError("the FP32 exporter failed"),
        )
        with failing:
            result.export_onnx("out/m.onnx", data[0], fp32_path="out/m_fp32.onnx")

    return model, data, call  # neither out/m.onnx nor the folder out remain


@case(wb.ConfigError, "fp32_path must be a file path")
def case_export_fp32_path_not_a_path(tmp):
    model, data, result = quantized()
    return model, data, lambda: result.export_onnx("m.onnx", data[0], fp32_path=3)


# file modes --------------------------------------------------------------------------------------
@case(SUCCEEDS, writes=("m.onnx", "m_fp32.onnx"))
def case_export_honours_the_umask(tmp):
    model, data, result = quantized()

    def call():
        with umask_set(0o022):
            result.export_onnx("m.onnx", data[0], fp32_path="m_fp32.onnx", check_fusion=False)
        assert stat.S_IMODE(os.stat("m.onnx").st_mode) == 0o644
        assert stat.S_IMODE(os.stat("m_fp32.onnx").st_mode) == 0o644

    return model, data, call


@case(SUCCEEDS, writes=("open.html", "private.html"))
def case_report_honours_the_umask(tmp):
    model, data, result = quantized()

    def call():
        for name, mask in (("open.html", 0o002), ("private.html", 0o077)):
            with umask_set(mask):
                result.report.to_html(name)
            assert stat.S_IMODE(os.stat(name).st_mode) == 0o666 & ~mask

    return model, data, call


@case(SUCCEEDS, writes=("ckpt", "ckpt/model.safetensors", "ckpt/config.json"))
def case_checkpoint_folder_honours_the_umask(tmp):
    from decoder_lm_models import tiny_llama, token_batches

    model, data = tiny_llama(tie=True), token_batches()
    config = wb.QuantConfig(weight=wb.Scheme(4, True, True, 0, group_size=32), activation=None)

    def call():
        result = wb.ptq(model, data, config=config, progress=False)
        with umask_set(0o022):
            folder = result.save_pretrained("ckpt")
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o755  # not mkdtemp's 0700
        for name in ("model.safetensors", "config.json"):
            assert stat.S_IMODE(os.stat(folder / name).st_mode) == 0o644

    return model, data, call


# quantizer sites ---------------------------------------------------------------------------------
class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        a = torch.relu(self.c1(x))
        y = a + torch.relu(self.c2(a))
        return self.fc(nn.functional.adaptive_avg_pool2d(y, 1).flatten(1))


def images() -> list[torch.Tensor]:
    torch.manual_seed(5)
    return [torch.rand(4, 1, 6, 6) for _ in range(2)]


@case(wb.ConfigError, r"'add#7' matches no layer.*site names as in report\.sites.*add#0")
def case_override_names_a_site_that_does_not_exist(tmp):
    config = wb.QuantConfig.preset("w4a4", overrides={"add#7": {"activation": None}})
    return _Residual().eval(), images(), ptq(_Residual().eval(), images(), config=config)


@case(SUCCEEDS)
def case_override_names_an_existing_site(tmp):
    model, data = _Residual().eval(), images()
    a8 = wb.Scheme(8, False, False)
    config = wb.QuantConfig.preset("w4a4", overrides={"add#0": {"activation": a8}})

    def call():
        sites = wb.ptq(model, data, config=config, progress=False).report.sites
        assert sites.set_index("site").loc["add#0", "bits"] == 8

    return model, data, call


# the sweep ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, tmp_path, monkeypatch):
    check_case(CASES[name], tmp_path, monkeypatch)


def test_the_second_sweep_covers_at_least_30_inputs():
    assert len(CASES) >= 30


def test_pandas_reads_the_sites_of_a_sweep_model():
    """The sites table is a plain DataFrame (the sweep's site cases index it by name)."""
    result = wb.ptq(_Residual().eval(), images(), progress=False)
    assert isinstance(result.report.sites, pd.DataFrame)
    assert result.report.sites["site"].is_unique
