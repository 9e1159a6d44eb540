"""Command line: ``python -m workbench demo``.

Thin: everything it does goes through the same public functions as the notebook front ends.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from workbench.core.observers import OBSERVER_NAMES
from workbench.errors import WorkbenchError

PRINTED_LAYER_COLUMNS = [  # of report.layers, what the demo prints
    "layer",
    "type",
    "status",
    "reason",
    "scheme",
    "num_scales",
    "weight_sqnr_db",
    "layer_sqnr_db",
    "output_sqnr_db",
    "output_cosine",
]


def run_demo(out: Path, epochs: int, progress: bool, onnx: bool = True) -> int:
    """Train the digits CNN, PTQ it with every observer and preset, export the int8 model to
    ONNX, check fusion and parity, benchmark it against FP32, print and save the report."""
    import workbench as wb
    from workbench.demo import accuracy, load_digits_data, train_digits_cnn

    out.parent.mkdir(parents=True, exist_ok=True)
    data = load_digits_data()
    print(f"Training the digits CNN ({len(data.train_y)} images, {epochs} epochs)...")
    model = train_digits_cnn(data, epochs=epochs)

    def eval_fn(m):
        return accuracy(m, data.test_x, data.test_y)

    calib = data.calib_batches()
    rows = []
    results = {}
    runs = [("int8", observer) for observer in OBSERVER_NAMES]
    runs += [("int8-per-tensor", "minmax"), ("int4-weight", "minmax"), ("w4a4", "minmax")]
    for preset, observer in runs:
        config = wb.QuantConfig.preset(preset, observer=observer)
        result = wb.ptq(model, calib, config=config, eval_fn=eval_fn, progress=progress)
        results[(preset, observer)] = result
        s = result.report.summary
        rows.append(
            {
                "preset": preset,
                "observer": observer,
                "fp32_acc_%": round(s["metric_fp32"], 2),
                "quant_acc_%": round(s["metric_quantized"], 2),
                "drop_pp": round(s["metric_drop"], 2),
                "size_bytes": s["quantized_bytes"],
                "compression": round(s["compression_ratio"], 2),
                "worst_sqnr_db": round(s["worst_output_sqnr_db"], 1),
            }
        )
    with pd.option_context("display.width", 160, "display.max_columns", 30):
        print("\nFP32 vs quantized accuracy on the digits test set:")
        print(pd.DataFrame(rows).to_string(index=False))
        best = results[("int8", "minmax")]
        print("\n" + best.report.summary_text())
        print("\nPer-layer report (int8, minmax):")
        print(best.report.layers[PRINTED_LAYER_COLUMNS].round(3).to_string(index=False))
        print("\nStorage (bytes):")
        print(best.report.storage.to_string(index=False))
        if onnx:
            export_and_benchmark(best, data, out.parent, wb.benchmark)
    best.report.to_html(out)
    print(f"\nHTML report written to {out}")
    return 0


def export_and_benchmark(result, data, directory: Path, benchmark) -> None:
    """INT8 and FP32 ONNX files, ONNX Runtime's fusion, parity with the simulation, speed."""
    int8_path = directory / "digits_int8.onnx"
    fp32_path = directory / "digits_fp32.onnx"
    example = data.test_x[:1]
    result.export_onnx(int8_path, example, fp32_path=fp32_path, check_fusion=False)
    print(
        f"\nONNX: {int8_path} ({int8_path.stat().st_size:,} B), "
        f"{fp32_path} ({fp32_path.stat().st_size:,} B)"
    )
    fusion = result.fusion(int8_path, warn=False)
    print("\nONNX Runtime fusion (integer kernel per quantized layer):")
    print(fusion.table.to_string(index=False))
    test_batches = [data.test_x[i : i + 64] for i in range(0, len(data.test_x), 64)]
    parity = result.parity(int8_path, test_batches)
    print("\nParity, ONNX Runtime vs the simulated model on the test set:")
    print(parity.table.to_string(index=False))
    bench = benchmark(fp32_path, int8_path, data.test_x[:64], threads=1)
    result.report.extra_tables["Benchmark"] = bench.table
    print("\nBenchmark, batch 64, 1 thread:")
    print(bench.table.round(3).to_string(index=False))
    print(bench.summary_text())
    if bench.speedup < 1.5:
        print(
            "The digits CNN is too small (about 0.3 M multiply-adds per image) for integer "
            "kernels to pay off over per-call overhead; tests/benchmarks/bench_export_resnet.py "
            "and bench_export_bert.py measure models where they do."
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workbench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="quantize the embedded digits CNN and report")
    demo.add_argument("--out", type=Path, default=Path("workbench_report.html"))
    demo.add_argument("--epochs", type=int, default=8)
    demo.add_argument("--no-progress", action="store_true")
    demo.add_argument(
        "--no-onnx", action="store_true", help="skip the ONNX export, fusion, parity, benchmark"
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            return run_demo(args.out, args.epochs, not args.no_progress, not args.no_onnx)
    except WorkbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
