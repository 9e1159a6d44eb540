"""CPU feature detection, the benchmark table and the fusion warning (no timing asserted)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import workbench as wb
from workbench.errors import ConfigError
from workbench.runtime.cpu_features import detect_cpu_features

CPUINFO = """processor\t: 0
model name\t: Example CPU
flags\t\t: fpu sse2 avx2 fma {extra}

processor\t: 1
model name\t: Example CPU
flags\t\t: fpu sse2 avx2 fma {extra}
"""


@pytest.mark.parametrize(
    ("extra", "expected", "words"),
    [
        ("avx512f avx512_vnni amx_tile amx_int8", (True, True, True, True), "AMX"),
        ("avx512f avx512_vnni", (True, True, True, False), "VNNI"),
        ("avx_vnni", (True, False, True, False), "VNNI"),
        ("", (True, False, False, False), "wb.Scheme(bits=7, per_channel=True)"),
    ],
)
def test_cpu_features_from_cpuinfo_flags(tmp_path, extra, expected, words):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO.format(extra=extra))
    features = detect_cpu_features(path)
    assert (features.avx2, features.avx512, features.vnni, features.amx) == expected
    assert features.model_name == "Example CPU"
    assert words in features.int8_outlook
    assert features.int8_outlook in features.summary()


def test_advised_7_bit_weights_keep_avx2_pair_sums_within_int16(tmp_path):
    """The advice without VNNI is a config the package runs: its exported weight codes times
    any uint8 activation, summed in pairs as vpmaddubsw does, fit in int16."""
    import onnx
    from onnx import numpy_helper

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    config = wb.QuantConfig(weight=wb.Scheme(bits=7, per_channel=True))
    result = wb.ptq(model, [torch.randn(64, 32)], config=config, progress=False)
    path = result.export_onnx(tmp_path / "w7.onnx", torch.randn(2, 32), check_fusion=False)
    codes = [
        numpy_helper.to_array(init)
        for init in onnx.load(str(path)).graph.initializer
        if init.name.endswith("weight_quantized")
    ]
    assert len(codes) == 2
    for weight in codes:
        assert weight.dtype == np.int8
        assert 2 * 255 * int(np.abs(weight.astype(np.int32)).max()) <= 2**15 - 1
    assert result.fusion(path, warn=False).all_fused


def test_cpu_features_without_cpuinfo(tmp_path):
    features = detect_cpu_features(tmp_path / "missing")
    assert not (features.avx2 or features.avx512 or features.vnni or features.amx)


@pytest.fixture(scope="module")
def mlp_result():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    return wb.ptq(model, [torch.randn(64, 32)], progress=False)


def test_benchmark_table_is_consistent(mlp_result, tmp_path):
    x = torch.randn(4, 32)
    int8 = mlp_result.export_onnx(tmp_path / "int8.onnx", x, fp32_path=tmp_path / "fp32.onnx")
    bench = wb.benchmark(tmp_path / "fp32.onnx", int8, x, threads=1, warmup=1, runs=5)
    table = bench.table.set_index("model")
    assert list(table.index) == ["fp32", "int8"]
    assert table.loc["int8", "file_bytes"] == int8.stat().st_size
    assert table.loc["fp32", "file_bytes"] == (tmp_path / "fp32.onnx").stat().st_size
    assert np.isclose(
        bench.speedup, table.loc["fp32", "latency_p50_ms"] / table.loc["int8", "latency_p50_ms"]
    )
    assert (table["latency_p90_ms"] >= table["latency_p50_ms"]).all()
    assert np.allclose(table["throughput_per_s"], 4 / (table["latency_p50_ms"] / 1000))
    assert bench.cpu.int8_outlook in repr(bench)


def test_benchmark_exports_a_result_and_fills_its_report(mlp_result):
    x = torch.randn(2, 32)
    bench = wb.benchmark(mlp_result, mlp_result, x, warmup=0, runs=2)
    assert set(bench.table["model"]) == {"fp32", "int8"}
    assert mlp_result.report.extra_tables["ONNX Runtime benchmark"] is bench.table
    assert "ONNX Runtime benchmark" in mlp_result.report._repr_html_()


def test_benchmark_rejects_missing_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        wb.benchmark(tmp_path / "a.onnx", tmp_path / "b.onnx", torch.randn(1, 4))


def test_unfused_layers_are_named_in_a_warning(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    result = wb.ptq(model, [torch.randn(4, 3, 8, 8)], config="int8-weight-only", progress=False)
    with pytest.warns(UserWarning, match=r"2 of 2 quantized layers did not fuse.*\b0, 2\b"):
        path = result.export_onnx(tmp_path / "wo.onnx", torch.randn(1, 3, 8, 8))
    fusion = result.fusion(path, warn=False)
    assert fusion.unfused == ["0", "2"]
    assert fusion.table["reason"].str.contains("input is not quantized").all()
    assert result.report.extra_tables["ONNX Runtime fusion"] is fusion.table
