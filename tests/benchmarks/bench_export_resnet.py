"""ResNet-18-shaped CNN, 224x224, batch 1: our INT8 export against FP32 and against ONNX
Runtime's own ``quantize_static`` (QDQ, per-channel, U8S8, after ``quant_pre_process``) of the
same FP32 model.

All three run side by side in one process (interleaved rounds, same threads and input).
Targets: INT8 >= 3x faster than FP32, at least as fast as quantize_static, file <= 0.3x FP32,
every quantized layer fused.

    python tests/benchmarks/bench_export_resnet.py [--runs 100] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import image_batches, ort_quantize_static, print_checks, resnet18_shaped

import workbench as wb


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calib-images", type=int, default=16)
    args = parser.parse_args()

    model = resnet18_shaped()
    calib = image_batches(args.calib_images, batch=1, seed=1)
    example = image_batches(1, batch=1, seed=2)[0]
    start = time.perf_counter()
    result = wb.ptq(model, calib, progress=False)
    print(f"PTQ: {time.perf_counter() - start:.1f} s, {result.report.summary_text()}\n")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        int8_path = result.export_onnx(
            tmp / "resnet_int8.onnx", example, fp32_path=tmp / "resnet_fp32.onnx"
        )
        print(f"export: {time.perf_counter() - start:.1f} s")
        ort_path = ort_quantize_static(tmp / "resnet_fp32.onnx", tmp / "resnet_ort.onnx", calib)

        fusion = result.fusion(int8_path)
        print(f"\nfusion: {fusion.summary_text()}")
        print(fusion.kernels.to_string(index=False))

        parity = result.parity(int8_path, image_batches(8, batch=1, seed=3))
        print(f"\nparity: {parity.summary_text()}")

        bench = wb.benchmark(
            tmp / "resnet_fp32.onnx",
            int8_path,
            example,
            threads=args.threads,
            warmup=args.warmup,
            runs=args.runs,
            others={"ort quantize_static": ort_path},
        )
    table = bench.table.set_index("model")
    ours, peer = table.loc["int8"], table.loc["ort quantize_static"]
    vs_peer = peer["latency_p50_ms"] / ours["latency_p50_ms"]
    print(f"\n{bench!r}\n")
    checks = [
        ("INT8 / FP32 speedup >= 3.0", bench.speedup, bench.speedup >= 3.0),
        ("quantize_static p50 / ours p50 >= 1.0", vs_peer, vs_peer >= 1.0),
        ("INT8 file / FP32 file <= 0.3", ours["size_vs_fp32"], ours["size_vs_fp32"] <= 0.3),
        ("unfused quantized layers == 0", len(fusion.unfused), fusion.all_fused),
    ]
    return print_checks(checks, digits=3)


if __name__ == "__main__":
    sys.exit(main())
