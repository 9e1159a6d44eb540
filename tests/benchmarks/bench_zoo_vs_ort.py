"""torchvision-structured CNNs at 224x224, batch 1, one thread: our INT8 export against ONNX
Runtime's own ``quantize_static`` (QDQ, per-channel, U8S8, after ``quant_pre_process``) of the
same FP32 export, and against FP32 — all timed side by side in one run.

Models (``tests/zoo/vision.py``, torchvision's module structure, random weights, BatchNorm
statistics set): ResNet-18, ResNet-50, MobileNetV2, MobileNetV3-Small.

Targets (issue "real model structures"): ours >= 1.05x the speed of quantize_static on each;
ResNet-18 >= 3.0x FP32 on an AVX512-VNNI CPU; every residual add and concat on an integer
kernel; ONNX Runtime against the simulation on 32 inputs: cosine >= 0.9999 and the largest
output difference <= 2 quantization steps. The machine may be shared: the load average is
printed with the results.

    python tests/benchmarks/bench_zoo_vs_ort.py [--models resnet18 ...] [--runs 30]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from models import machine_line, ort_quantize_static, print_checks  # noqa: E402
from zoo import vision  # noqa: E402

import workbench as wb  # noqa: E402

MODELS = {
    "resnet18": vision.resnet18,
    "resnet50": vision.resnet50,
    "mobilenet_v2": vision.mobilenet_v2,
    "mobilenet_v3_small": vision.mobilenet_v3_small,
}


def measure(name: str, args, tmp: Path) -> list[tuple[str, float, bool]]:
    model = MODELS[name]()
    calib = vision.images(args.calib_images, 224, batch=1, seed=1)
    example = vision.images(1, 224, batch=1, seed=2)[0]
    start = time.perf_counter()
    result = wb.ptq(model, calib, progress=False)
    ptq_s = time.perf_counter() - start
    int8 = result.export_onnx(tmp / f"{name}_int8.onnx", example, fp32_path=tmp / f"{name}.onnx")
    export_s = time.perf_counter() - start - ptq_s
    peer = ort_quantize_static(tmp / f"{name}.onnx", tmp / f"{name}_ort.onnx", calib)
    fusion = result.fusion(int8, warn=False)
    parity = result.parity(int8, vision.images(32, 224, batch=1, seed=3), max_batches=32)
    bench = wb.benchmark(
        tmp / f"{name}.onnx",
        int8,
        example,
        threads=1,
        warmup=args.warmup,
        runs=args.runs,
        others={"ort quantize_static": peer},
    )
    table = bench.table.set_index("model")
    ours, theirs = table.loc["int8"], table.loc["ort quantize_static"]
    vs_peer = theirs["latency_p50_ms"] / ours["latency_p50_ms"]
    ops = fusion.ops
    residual = ops[ops["kind"].isin(["add", "concat"])]
    row = parity.table.iloc[0]
    print(f"\n== {name}: PTQ {ptq_s:.1f} s, export {export_s:.1f} s")
    print(f"fusion: {fusion.summary_text()}")
    print(bench.table.to_string(index=False))
    print(f"parity: {parity.summary_text()}")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    checks = [
        (f"{name}: quantize_static p50 / ours p50 >= 1.05", vs_peer, vs_peer >= 1.05),
        (
            f"{name}: residual adds / concats on integer kernels (of {len(residual)})",
            float(residual["fused"].sum()),
            bool(residual["fused"].all()),
        ),
        (f"{name}: parity cosine >= 0.9999", row["cosine"], row["cosine"] >= 0.9999),
        (
            f"{name}: parity max diff <= 2 steps",
            row["max_diff_steps"],
            row["max_diff_steps"] <= 2.0,
        ),
    ]
    if name == "resnet18":
        checks.append(
            (
                f"{name}: INT8 / FP32 speedup >= 3.0 (AVX512-VNNI)",
                bench.speedup,
                bench.speedup >= 3.0,
            )
        )
    return checks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--calib-images", type=int, default=16)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)

    print(machine_line())
    checks = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            checks += measure(name, args, Path(tmp))
    print()
    return print_checks(checks, digits=3)


if __name__ == "__main__":
    sys.exit(main())
