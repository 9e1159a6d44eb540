"""BERT-style encoder (6 layers, hidden 384, 12 heads, intermediate 1536; randomly initialised
from a transformers config), batch 32 x 64 tokens: our INT8 export against FP32 on ONNX
Runtime, with ONNX Runtime's ``quantize_dynamic`` (per-channel) of the same FP32 model timed
in the same rounds for reference.

Targets: INT8 >= 2x faster than FP32; output cosine to FP32 >= 0.99; the ONNX Runtime INT8
model's cosine to FP32 within 0.002 of the simulated model's; file <= 0.3x FP32.

    python tests/benchmarks/bench_export_bert.py [--runs 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import bert_encoder, print_checks, token_batches

import workbench as wb


def ort_quantize_dynamic(fp32_path: Path, out_path: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32_path), str(out_path), per_channel=True, weight_type=QuantType.QInt8)
    return out_path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    model = bert_encoder(layers=6, hidden=384, heads=12, intermediate=1536)
    calib = token_batches(4, batch=32, seq=64, seed=1)
    example = token_batches(1, batch=32, seq=64, seed=2)[0]
    config = wb.QuantConfig.preset("int8", quantize_embeddings=True)
    start = time.perf_counter()
    result = wb.ptq(model, calib, config=config, progress=False)
    print(f"PTQ: {time.perf_counter() - start:.1f} s, {result.report.summary_text()}\n")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        int8_path = result.export_onnx(
            tmp / "bert_int8.onnx", example, fp32_path=tmp / "bert_fp32.onnx"
        )
        print(f"export: {time.perf_counter() - start:.1f} s")
        dynamic_path = ort_quantize_dynamic(tmp / "bert_fp32.onnx", tmp / "bert_dynamic.onnx")

        fusion = result.fusion(int8_path)
        print(f"\nfusion: {fusion.summary_text()}")
        print(fusion.kernels.to_string(index=False))

        parity = result.parity(int8_path, token_batches(2, batch=32, seq=64, seed=3))
        print(f"\nparity: {parity.summary_text()}")
        row = parity.table.iloc[0]

        bench = wb.benchmark(
            tmp / "bert_fp32.onnx",
            int8_path,
            example,
            threads=args.threads,
            warmup=args.warmup,
            runs=args.runs,
            others={"ort quantize_dynamic": dynamic_path},
        )
    ours = bench.table.set_index("model").loc["int8"]
    print(f"\n{bench!r}\n")
    cosine_ort = row["cosine_ort_vs_fp32"]
    gap = abs(row["cosine_sim_vs_fp32"] - cosine_ort)
    checks = [
        ("INT8 / FP32 speedup >= 2.0", bench.speedup, bench.speedup >= 2.0),
        ("ORT INT8 cosine to FP32 >= 0.99", cosine_ort, cosine_ort >= 0.99),
        ("|cosine(sim, FP32) - cosine(ORT, FP32)| <= 0.002", gap, gap <= 0.002),
        ("INT8 file / FP32 file <= 0.3", ours["size_vs_fp32"], ours["size_vs_fp32"] <= 0.3),
        ("unfused quantized layers == 0", len(fusion.unfused), fusion.all_fused),
    ]
    return print_checks(checks, digits=4)


if __name__ == "__main__":
    sys.exit(main())
