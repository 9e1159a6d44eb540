"""wb.autotune on the digits MLP: the budget, Ctrl-C, the choice within max_drop, the order
and the skip reasons, objective="size"; the selection is tested with latencies given by
``latency_fn`` (no timing noise), the ONNX Runtime timing once."""

from __future__ import annotations

import copy
import math
import tempfile
import warnings

import onnx
import pandas as pd
import pytest
import torch
from digits_models import tiny_mlp

import workbench as wb
from workbench.demo import accuracy, load_digits_data
from workbench.engine.placement.layers import iter_quantized_layers
from workbench.engine.quantizers.dynamic import DynamicActivationQuantizer
from workbench.workflows.autotune import INTERRUPTED_WARNING
from workbench.workflows.autotune_result import select_best
from workbench.workflows.autotune_space import STAGES

DATA = load_digits_data()
CALIB = [DATA.train_x[i * 64 : (i + 1) * 64].flatten(1) for i in range(4)]
TEST_X, TEST_Y = DATA.test_x.flatten(1), DATA.test_y


@pytest.fixture(scope="module")
def model():
    return tiny_mlp()


def kind_of(model: torch.nn.Module) -> str:
    """static / dynamic / weight-only / fp32, from the quantized model's own modules."""
    layers = [layer for _, layer in iter_quantized_layers(model)]
    if not layers:
        return "fp32"
    if any(isinstance(m, DynamicActivationQuantizer) for m in model.modules()):
        return "dynamic"
    if all(layer.input_quantizer is None for layer in layers):
        return "weight-only"
    return "static"


def graph_latency_ms(path) -> float:
    """A latency read off the graph's ops (not timed): static QDQ 0.3, dynamic 0.5,
    weight-only 0.8, FP32 1.0 ms; each Linear kept FP32 beside quantized ones adds 0.05."""
    graph = onnx.load(str(path)).graph
    ops = [node.op_type for node in graph.node]
    float_weights = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    kept = sum(
        1
        for node in graph.node
        if node.op_type in ("MatMul", "Gemm") and float_weights & set(node.input)
    )
    if "DynamicQuantizeLinear" in ops:
        return 0.5 + 0.05 * kept
    if "QuantizeLinear" in ops:
        return 0.3 + 0.05 * kept
    if "DequantizeLinear" in ops or "MatMulNBits" in ops:
        return 0.8 + 0.05 * kept
    return 1.0


def accuracy_fn(m: torch.nn.Module) -> float:
    return accuracy(m, TEST_X, TEST_Y)


def metric_by_kind(values: dict[str, float]):
    """An eval_fn giving each kind of model a fixed metric (the selection under test)."""

    def eval_fn(m: torch.nn.Module) -> float:
        return values[kind_of(m)]

    return eval_fn


def test_best_meets_max_drop_and_is_the_fastest_within_it(model):
    before = copy.deepcopy(model.state_dict())
    eval_fn = metric_by_kind({"fp32": 1.0, "static": 0.9, "dynamic": 0.995, "weight-only": 0.999})
    result = wb.autotune(
        model, CALIB, eval_fn, max_drop=0.01, budget=12, latency_fn=graph_latency_ms
    )
    assert result.budget_met
    best = result.best_row
    # static misses (drop 0.1); dynamic (0.5 ms) beats weight-only (0.8 ms) within the drop
    assert kind_of(result.best.model) == "dynamic"
    assert 1.0 - eval_fn(result.best.model) <= 0.01
    assert best["latency_ms"] == pytest.approx(0.5)
    within = result.table[result.table["meets_max_drop"].eq(True)]
    assert within["latency_ms"].min() == pytest.approx(best["latency_ms"])
    for key, value in before.items():  # the user's model is untouched
        assert torch.equal(model.state_dict()[key], value)


def test_stages_in_order_and_skips_say_why(model):
    # static (0.3 ms) and dynamic (0.5 ms) miss, weight-only (0.8 ms) meets: the two faster
    # layouts are tried further (observers, methods, per-layer), weight-only's are not
    eval_fn = metric_by_kind({"fp32": 1.0, "static": 0.9, "dynamic": 0.9, "weight-only": 0.999})
    result = wb.autotune(
        model, CALIB, eval_fn, max_drop=0.01, budget=30, latency_fn=graph_latency_ms
    )
    table = result.table
    order = [STAGES.index(stage) for stage in table["stage"]]
    assert order == sorted(order)
    assert {"preset", "observer", "method"} <= set(table["stage"])
    tried = table[table["drop"].notna()]
    assert set(tried["status"]) <= {"best", "meets max_drop", "misses max_drop"}
    misses = tried[tried["status"] == "misses max_drop"]
    assert misses["reason"].str.contains("max_drop").all()
    assert kind_of(result.best.model) == "weight-only"
    # per-layer precision of the static layout keeps layers FP32: slower layouts are measured
    per_layer = table[table["stage"] == "per-layer"]
    assert not per_layer.empty
    assert (per_layer["why"].str.contains("sensitivity") | per_layer["status"].eq("skipped")).all()


def test_slower_layouts_are_skipped_with_the_reason(model):
    eval_fn = metric_by_kind({"fp32": 1.0, "static": 0.995, "dynamic": 0.9, "weight-only": 0.9})
    result = wb.autotune(
        model, CALIB, eval_fn, max_drop=0.01, budget=30, latency_fn=graph_latency_ms
    )
    table = result.table
    assert kind_of(result.best.model) == "static"
    skipped = table[table["status"] == "skipped"]
    # the dynamic and weight-only layouts measured 0.5 and 0.8 ms against 0.3: nothing of
    # theirs is tried after the presets
    assert not skipped.empty
    assert skipped["reason"].str.contains("cannot win").all()
    after_presets = table[(table["stage"] != "preset") & table["drop"].notna()]
    assert after_presets.empty


def test_budget_of_evaluations_is_respected(model):
    calls = []

    def eval_fn(m):
        calls.append(1)
        return 0.0 if calls[1:] else 1.0  # every candidate misses: the search runs on

    with pytest.warns(UserWarning, match="no candidate meets"):
        result = wb.autotune(
            model, CALIB, eval_fn, max_drop=0.01, budget=5, latency_fn=graph_latency_ms
        )
    assert len(calls) == 5 == result.evaluations
    assert result.table["drop"].notna().sum() == 4
    assert "5 evaluations" in result.stopped_because
    assert result.table["status"].eq("not run").any()
    assert (
        result.table.loc[result.table["status"] == "not run", "reason"].str.contains("budget").all()
    )
    assert not result.budget_met and result.best is not None  # the smallest drop


def test_budget_of_seconds_stops_before_the_next_candidate(model):
    calls = []

    def eval_fn(m):
        calls.append(1)
        return 1.0

    with pytest.warns(UserWarning, match="no candidate meets"):
        result = wb.autotune(
            model, CALIB, eval_fn, budget={"seconds": 1e-9}, latency_fn=graph_latency_ms
        )
    assert len(calls) == 1  # the FP32 metric only
    assert result.table["status"].eq("not run").all() and result.best is None


def test_interrupt_returns_the_table_and_the_best_run_so_far(model):
    calls = []

    def eval_fn(m):
        calls.append(kind_of(m))
        if len(calls) == 4:  # FP32, int8, int8-dynamic, then Ctrl-C during int8-weight-only
            raise KeyboardInterrupt
        return {"fp32": 1.0, "static": 0.999, "dynamic": 0.999}[calls[-1]]

    with pytest.warns(UserWarning, match=INTERRUPTED_WARNING):
        result = wb.autotune(
            model, CALIB, eval_fn, max_drop=0.01, budget=30, latency_fn=graph_latency_ms
        )
    assert result.interrupted and "interrupted" in result.stopped_because
    table = result.table
    assert list(table["candidate"]) == ["int8", "int8-dynamic", "int8-weight-only"]
    assert list(table["status"]) == ["best", "meets max_drop", "not run"]
    assert kind_of(result.best.model) == "static"
    assert result.best.report.summary["autotune"]["interrupted"] is True


def test_objective_size_picks_the_smallest_file(model, tmp_path):
    result = wb.autotune(
        model,
        CALIB,
        accuracy_fn,
        max_drop=100.0,  # every candidate is within it: the choice is the size alone
        objective="size",
        budget=10,
        latency_fn=graph_latency_ms,
    )
    tried = result.table[result.table["file_bytes"].notna()]
    assert set(tried["candidate"]) == {"int8", "int8-weight-only", "int4-weight-g32"}
    # independent: each preset's file written again here, and its bytes on disk
    sizes = {}
    for name in tried["candidate"]:
        path = wb.ptq(model, CALIB, name, progress=False).export_onnx(
            tmp_path / f"{name}.onnx", CALIB[0], check_fusion=False
        )
        sizes[name] = path.stat().st_size
    smallest = min(sizes, key=sizes.get)
    assert result.best_row["candidate"] == smallest == "int4-weight-g32"
    assert int(result.best_row["file_bytes"]) == sizes[smallest]


def test_onnx_runtime_timing_and_the_report_bundle(model, tmp_path):
    result = wb.autotune(model, CALIB, accuracy_fn, max_drop=2.0, presets=("int8",), budget=3)
    best = result.best_row
    assert best["latency_ms"] > 0 and best["fp32_latency_ms"] > 0
    assert best["latency_vs_fp32"] == pytest.approx(best["latency_ms"] / best["fp32_latency_ms"])
    written = result.export_onnx(tmp_path / "best.onnx")
    assert written.stat().st_size == int(best["file_bytes"])
    bundle = result.best.report.to_json()
    assert bundle["summary"]["autotune"]["best"]["candidate"] == "int8"
    assert "Autotune candidates" in bundle["tables"]
    assert bundle["summary"]["metric_drop"] == pytest.approx(float(best["drop"]))


def test_select_best_takes_the_smallest_key_within_max_drop():
    table = pd.DataFrame(
        {
            "candidate": ["a", "b", "c", "d"],
            "meets_max_drop": [False, True, True, True],
            "drop": [0.5, 0.004, 0.001, 0.002],
            "latency_ms": [0.1, 0.4, 0.4, math.nan],
            "file_bytes": [10, 30, 20, 5],
        }
    )
    assert select_best(table, "latency")["candidate"] == "c"  # tie on latency: smaller drop
    assert select_best(table, "size")["candidate"] == "d"
    assert select_best(table[table["candidate"] == "a"], "latency") is None


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"objective": "speed"}, "objective"),
        ({"budget": 1}, "budget evaluations"),
        ({"budget": "10 min"}, "budget must be"),
        ({"budget": {"minutes": 3}}, "unknown key"),
        ({"presets": ("int9",)}, "unknown preset"),
        ({"max_drop": -1}, "max_drop"),
    ],
)
def test_bad_options_name_the_fix(model, options, match):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(wb.ConfigError, match=match):
            wb.autotune(model, CALIB, accuracy_fn, **options)


def test_interrupt_in_the_final_timing_keeps_the_search(model, monkeypatch):
    from workbench.runtime import latency_meter

    def equal_timing(self, path):  # every file as fast: all are finalists
        return latency_meter.Timing(1.0, 2.0)

    def interrupted(self, paths):
        raise KeyboardInterrupt

    monkeypatch.setattr(latency_meter.SideBySideLatency, "__call__", equal_timing)
    monkeypatch.setattr(latency_meter.SideBySideLatency, "side_by_side", interrupted)
    with pytest.warns(UserWarning, match="final side-by-side timing is left out"):
        result = wb.autotune(model, CALIB, accuracy_fn, max_drop=100.0, budget=4)
    assert result.interrupted and result.final_timing is None
    assert list(result.table["status"]).count("best") == 1
    within = result.table[result.table["meets_max_drop"].eq(True)]
    smallest_drop = within.sort_values("drop", kind="stable").iloc[0]["candidate"]
    assert result.best_row["candidate"] == smallest_drop  # equal latencies: the smaller drop


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("not a model", CALIB, accuracy_fn), wb.ModelError),
        ((None, [], accuracy_fn), wb.CalibrationError),
        ((None, CALIB, lambda m: float("nan")), wb.MetricError),
    ],
)
def test_bad_input_is_one_error_and_leaves_no_file(model, args, error, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    args = (model if args[0] is None else args[0], *args[1:])
    with pytest.raises(error):
        wb.autotune(*args, latency_fn=graph_latency_ms)
    assert list(tmp_path.iterdir()) == []
