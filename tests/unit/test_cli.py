"""The command line: ``python -m workbench demo``."""

from __future__ import annotations

import subprocess
import sys

import pytest

import workbench as wb
from workbench import cli

OBSERVERS = ["minmax", "percentile", "mse", "entropy"]


def test_demo_prints_the_accuracy_table_and_writes_html(tmp_path, capsys):
    out = tmp_path / "report.html"
    code = cli.main(["demo", "--epochs", "2", "--no-progress", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr()
    assert "calibrating" not in printed.err  # --no-progress
    text = printed.out
    assert "FP32 vs quantized accuracy" in text
    header = next(line for line in text.splitlines() if "fp32_acc_%" in line)
    assert header.split()[:5] == ["preset", "observer", "fp32_acc_%", "quant_acc_%", "drop_pp"]
    accuracy_table = text.split("FP32 vs quantized accuracy")[1].split("\n\n")[0]
    rows = [line.split() for line in accuracy_table.splitlines() if line.split()[:1] == ["int8"]]
    assert [row[1] for row in rows] == OBSERVERS
    for row in rows:
        fp32, quantized, drop = (float(v) for v in row[2:5])
        assert 0.0 <= quantized <= 100.0 and fp32 > 50.0
        assert drop == pytest.approx(fp32 - quantized, abs=0.011)
    assert any(line.split()[:1] == ["int4-weight"] for line in text.splitlines())
    assert "Per-layer report" in text and "Storage (bytes)" in text
    assert f"HTML report written to {out}" in text
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>")
    assert "conv1" in page and "folded into conv1" in page and ">total<" in page
    # the int8 model went to ONNX, every layer fused, ONNX Runtime agrees with the simulation
    int8_file, fp32_file = tmp_path / "digits_int8.onnx", tmp_path / "digits_fp32.onnx"
    assert int8_file.stat().st_size < 0.35 * fp32_file.stat().st_size
    fusion_rows = text.split("integer kernel per quantized layer):")[1].split("\n\n")[0]
    fused = [line.split()[2] for line in fusion_rows.strip().splitlines()[1:]]
    assert fused == ["True"] * 4
    parity_line = text.split("simulated model on the test set:")[1].strip().splitlines()[1]
    assert float(parity_line.split()[8]) >= 0.995  # top-1 agreement
    assert "Benchmark, batch 64, 1 thread" in text and "Benchmark" in page


def test_workbench_error_becomes_one_line_and_exit_code_2(monkeypatch, capsys, tmp_path):
    def failing_demo(*_args):
        raise wb.ConfigError("unknown preset 'x'; choose one of int8")

    monkeypatch.setattr(cli, "run_demo", failing_demo)
    assert cli.main(["demo", "--out", str(tmp_path / "r.html")]) == 2
    assert capsys.readouterr().err == "error: unknown preset 'x'; choose one of int8\n"


def test_usage_errors_exit_through_argparse(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", "--epochs", "two"])
    assert info.value.code == 2
    assert "invalid int value" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    done = subprocess.run(
        [sys.executable, "-m", "workbench", "demo", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0
    assert "--epochs" in done.stdout and "--no-progress" in done.stdout and "--out" in done.stdout
