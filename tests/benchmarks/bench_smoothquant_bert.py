"""SmoothQuant on the outlier BERT (``tests/zoo/outlier_bert.py``: a BERT from a config whose
LayerNorms carry a few 20-100x channels, as pretrained BERT and OPT do), on ONNX Runtime, one
thread: static int8 (minmax) against static int8 + SmoothQuant (alpha 0.5 and "auto"), our
int8-dynamic, and ONNX Runtime's own ``quantize_dynamic`` (per-channel) of the same FP32 model,
all timed in the same rounds.

Targets: with SmoothQuant, ORT output cosine to FP32 >= 0.995 where static minmax is below
0.99, at >= 2.2x FP32 speed, every Linear on an integer kernel.

The model is the zoo's outlier BERT as the tests build it (2 layers, hidden 128); ``--hidden``
and ``--layers`` make a larger one. Each run prints ``lscpu``'s model name and the CPU's
integer features: without VNNI (AVX2), ONNX Runtime's U8S8 kernels saturate int16 pair sums
with 8-bit weights, so its cosine falls below the simulation's (``--weight-bits 7`` avoids it).

    python tests/benchmarks/bench_smoothquant_bert.py            # batch 8 x 128 tokens
    python tests/benchmarks/bench_smoothquant_bert.py --full     # batch 32 x 128 tokens
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from models import machine_line, print_checks  # noqa: E402
from zoo.outlier_bert import outlier_bert, outlier_tokens  # noqa: E402

import workbench as wb  # noqa: E402
from workbench.runtime.ort_session import make_session, run_session  # noqa: E402


def configs(weight_bits: int) -> dict[str, wb.QuantConfig]:
    weight = wb.Scheme(bits=weight_bits, per_channel=True)
    return {
        "int8 minmax": wb.QuantConfig.preset("int8", weight=weight),
        "int8 + SmoothQuant 0.5": wb.QuantConfig.preset("int8", weight=weight, smoothquant=0.5),
        "int8 + SmoothQuant auto": wb.QuantConfig.preset("int8", weight=weight, smoothquant="auto"),
        "int8-dynamic": wb.QuantConfig.preset("int8-dynamic", weight=weight),
    }


def cosine(a, b) -> float:
    a, b = np.asarray(a).ravel().astype(np.float64), np.asarray(b).ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def ort_quantize_dynamic(fp32_path: Path, out_path: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32_path), str(out_path), per_channel=True, weight_type=QuantType.QInt8)
    return out_path


def ort_output(path: Path, batch: dict) -> np.ndarray:
    return run_session(make_session(path, threads=1), batch)[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="batch 32 x 128 tokens")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--weight-bits",
        type=int,
        default=8,
        help="7 keeps ONNX Runtime's U8S8 kernels exact on CPUs without VNNI (AVX2)",
    )
    args = parser.parse_args()
    batch = 32 if args.full else args.batch
    torch.set_num_threads(1)
    print(machine_line())
    print(f"outlier BERT: {args.layers} layers, hidden {args.hidden}; batch {batch} x {args.seq}")

    model = outlier_bert(hidden=args.hidden, layers=args.layers, heads=4)
    calib = outlier_tokens(4, batch=batch, seq=args.seq, seed=1)
    example = outlier_tokens(1, batch=batch, seq=args.seq, seed=2)[0]
    rows, paths, fused, simulated = {}, {}, {}, {}
    with torch.no_grad():
        expected = model(**example).last_hidden_state.numpy()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp32_path = None
        for label, config in configs(args.weight_bits).items():
            start = time.perf_counter()
            result = wb.ptq(model, calib, config=config, progress=False)
            with torch.no_grad():
                simulated[label] = cosine(result.model(**example).last_hidden_state, expected)
            name = label.replace(" ", "_").replace(".", "").replace("+", "")
            kwargs = {"fp32_path": tmp / "fp32.onnx"} if fp32_path is None else {}
            paths[label] = result.export_onnx(tmp / f"{name}.onnx", example, **kwargs)
            fp32_path = tmp / "fp32.onnx"
            fusion = result.fusion(paths[label], warn=False)
            fused[label] = len(fusion.unfused)
            folds = sorted({p.smoothing_fold for p in result.plans if p.smoothing_fold})
            print(
                f"{label}: PTQ + export {time.perf_counter() - start:.1f} s; "
                f"{fusion.summary_text()}" + (f"; smoothing folded as {folds}" if folds else "")
            )
        paths["ort quantize_dynamic"] = ort_quantize_dynamic(fp32_path, tmp / "ort_dynamic.onnx")
        reference = ort_output(fp32_path, example)
        for label, path in paths.items():
            rows[label] = cosine(ort_output(path, example), reference)
        static = paths.pop("int8 minmax")
        bench = wb.benchmark(
            fp32_path,
            static,
            example,
            threads=1,
            warmup=args.warmup,
            runs=args.runs,
            others=paths,
        )
    table = bench.table.set_index("model")
    table = table.rename(index={"int8": "int8 minmax"})
    table["ort_cosine_vs_fp32"] = [rows.get(name, 1.0) for name in table.index]
    table["sim_cosine_vs_fp32"] = [simulated.get(name, float("nan")) for name in table.index]
    shown = [
        "latency_p50_ms",
        "speedup_vs_fp32",
        "size_vs_fp32",
        "ort_cosine_vs_fp32",
        "sim_cosine_vs_fp32",
    ]
    print()
    print(table[shown].to_string(float_format=lambda v: f"{v:.4f}"))
    print(f"\n{bench.cpu!r}; weights at {args.weight_bits} bits")

    minmax = rows["int8 minmax"]
    checks = [("static minmax cosine < 0.99", minmax, minmax < 0.99)]
    for label in ("int8 + SmoothQuant 0.5", "int8 + SmoothQuant auto"):
        speed = float(table.loc[label, "speedup_vs_fp32"])
        checks += [
            (f"{label}: ORT cosine to FP32 >= 0.995", rows[label], rows[label] >= 0.995),
            (f"{label}: speedup vs FP32 >= 2.2", speed, speed >= 2.2),
            (f"{label}: unfused Linears == 0", fused[label], fused[label] == 0),
        ]
    return print_checks(checks, digits=4)


if __name__ == "__main__":
    sys.exit(main())
