"""Dynamic quantization on the outlier BERT (tests/zoo/outlier_bert.py: a BERT from a
transformers config whose LayerNorms carry a few outlier channels, as pretrained BERT and OPT
do; 6 layers, hidden 384, 12 heads): our ``int8-dynamic`` export against ONNX Runtime's
``quantize_dynamic`` (per-channel) of the same FP32 export, one thread, in the same rounds;
static minmax ``int8`` beside them for reference.

Targets: ONNX Runtime output cosine to FP32 at least quantize_dynamic's; speed at least 1.0x
of it; |cosine(simulation, FP32) - cosine(ORT, FP32)| <= 0.001.

On a CPU without VNNI (AVX2 only), ONNX Runtime's U8S8 kernels add pairs of u8 x s8 products
in int16 with saturation, with 8-bit weights (ours and quantize_dynamic's alike); the script
then also measures the simulation gap with 7-bit weights, where the sums cannot saturate.

    python tests/benchmarks/bench_dynamic_bert.py            # batch 8 x 128 tokens
    python tests/benchmarks/bench_dynamic_bert.py --full     # batch 32 x 128 tokens
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import machine_line, print_checks
from zoo.outlier_bert import outlier_bert, outlier_tokens

import workbench as wb
from workbench.runtime.cpu_features import detect_cpu_features
from workbench.runtime.ort_session import make_session, run_session


def ort_quantize_dynamic(fp32_path: Path, out_path: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32_path), str(out_path), per_channel=True, weight_type=QuantType.QInt8)
    return out_path


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def ort_cosine(path: Path, batches: list, fp32: list[np.ndarray]) -> float:
    session = make_session(path, 1)
    outputs = [run_session(session, batch)[0] for batch in batches]
    return cosine(np.concatenate(outputs), np.concatenate(fp32))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="batch 32 x 128 (default 8 x 128)")
    parser.add_argument("--layers", type=int, default=6, help="encoder layers (default 6)")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    batch, seq = (32, 128) if args.full else (8, 128)
    cpu = detect_cpu_features()
    print(f"{machine_line()}; {args.layers} layers, batch {batch} x {seq}, 1 thread")

    model = outlier_bert(hidden=384, layers=args.layers, heads=12)
    calib = outlier_tokens(4, batch=batch, seq=seq, seed=1)
    example = outlier_tokens(1, batch=batch, seq=seq, seed=2)[0]
    evaluation = outlier_tokens(2, batch=batch, seq=seq, seed=3)
    with torch.no_grad():
        fp32_out = [model(**b).last_hidden_state.numpy() for b in evaluation]

    start = time.perf_counter()
    dynamic = wb.ptq(model, config="int8-dynamic")  # no calibration data needed
    print(f"int8-dynamic PTQ (no data): {time.perf_counter() - start:.2f} s")
    static = wb.ptq(model, calib, config="int8", progress=False)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp32_path = tmp / "fp32.onnx"
        ours = dynamic.export_onnx(tmp / "dynamic.onnx", example, fp32_path=fp32_path)
        static_path = static.export_onnx(tmp / "static.onnx", example)
        theirs = ort_quantize_dynamic(fp32_path, tmp / "ort_dynamic.onnx")

        fusion = dynamic.fusion(ours)
        print(f"\nfusion: {fusion.summary_text()}")
        print(fusion.kernels.to_string(index=False))
        parity = dynamic.parity(ours, evaluation)
        row = parity.table.iloc[0]
        gap = abs(row["cosine_sim_vs_fp32"] - row["cosine_ort_vs_fp32"])
        print(f"\nparity (8-bit weights): {parity.summary_text()}")
        gap_exact = None
        if not (cpu.vnni or cpu.amx):
            exact_weight = wb.Scheme(bits=7, symmetric=True, per_channel=True)
            exact = wb.ptq(model, config=wb.QuantConfig.preset("int8-dynamic", weight=exact_weight))
            exact_path = exact.export_onnx(tmp / "dynamic7.onnx", example, check_fusion=False)
            exact_row = exact.parity(exact_path, evaluation).table.iloc[0]
            gap_exact = abs(exact_row["cosine_sim_vs_fp32"] - exact_row["cosine_ort_vs_fp32"])
            print(f"parity (7-bit weights, no saturation): gap {gap_exact:.6f}")

        cos_ours = ort_cosine(ours, evaluation, fp32_out)
        cos_theirs = ort_cosine(theirs, evaluation, fp32_out)
        cos_static = ort_cosine(static_path, evaluation, fp32_out)
        print(
            f"\noutput cosine to FP32 (ONNX Runtime): int8-dynamic {cos_ours:.5f}, "
            f"ORT quantize_dynamic {cos_theirs:.5f}, static int8 minmax {cos_static:.5f}"
        )
        bench = wb.benchmark(
            fp32_path,
            ours,
            example,
            threads=1,
            warmup=args.warmup,
            runs=args.runs,
            others={"ort quantize_dynamic": theirs, "static int8": static_path},
        )
    print(f"\n{bench!r}\n")
    p50 = bench.table.set_index("model")["latency_p50_ms"]
    speed_vs_ort = float(p50["ort quantize_dynamic"] / p50["int8"])
    print(f"int8-dynamic: {speed_vs_ort:.2f}x ORT quantize_dynamic, {bench.speedup:.2f}x FP32")
    checks = [
        (
            "cosine(ORT, FP32) - quantize_dynamic's >= 0",
            cos_ours - cos_theirs,
            cos_ours >= cos_theirs,
        ),
        ("speed vs ORT quantize_dynamic >= 1.0", speed_vs_ort, speed_vs_ort >= 1.0),
        ("|cosine gap ORT vs simulation| (8-bit) <= 0.001", gap, gap <= 0.001),
        ("every Linear fused", len(fusion.unfused), fusion.all_fused),
    ]
    if gap_exact is not None:
        checks.append(("|cosine gap| (7-bit weights) <= 0.001", gap_exact, gap_exact <= 0.001))
    return print_checks(checks, digits=5)


if __name__ == "__main__":
    sys.exit(main())
