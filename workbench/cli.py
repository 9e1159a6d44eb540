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


def run_demo(out: Path, epochs: int, progress: bool) -> int:
    """Train the digits CNN, PTQ it with every observer and preset, print and save reports."""
    import workbench as wb
    from workbench.demo import accuracy, load_digits_data, train_digits_cnn

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
        columns = ["layer", "type", "status", "reason", "scheme", "num_scales"]
        columns += ["weight_sqnr_db", "layer_sqnr_db", "output_sqnr_db", "output_cosine"]
        print(best.report.layers[columns].round(3).to_string(index=False))
        print("\nStorage (bytes):")
        print(best.report.storage.to_string(index=False))
    best.report.to_html(out)
    print(f"\nHTML report written to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workbench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="quantize the embedded digits CNN and report")
    demo.add_argument("--out", type=Path, default=Path("workbench_report.html"))
    demo.add_argument("--epochs", type=int, default=8)
    demo.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            return run_demo(args.out, args.epochs, not args.no_progress)
    except WorkbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
