"""Big models: memory and time of ``wb.ptq`` + ``export_onnx`` against ONNX Runtime's
``MatMulNBitsQuantizer`` on the same weights, in one run.

A LLaMA-shaped decoder with random weights from a ``transformers`` config, at
``int4-weight-g32`` with 4 calibration batches of 64 tokens:

* ``--model 0.54b``: hidden 2048, 9 layers, 16 / 4 heads (GQA), intermediate 5632,
  vocabulary 32000 (2.0 GiB of FP32 weights);
* ``--model 1.1b``: TinyLlama's shape, 22 layers, 32 / 4 heads (4.1 GiB).

Each side runs in its own process, one after the other, and reports its own peak RSS
(``ru_maxrss``):

1. a writer builds the model (seed 0) and writes its FP32 ONNX file (not timed);
2. ours builds the same model (the user's model: its weights count in our peak; the peak is
   reset after building it, so transformers' own construction transient is not ours), then
   times ``wb.ptq`` and ``export_onnx(check_fusion=False)``; then, untimed for the targets,
   ``fusion`` and one ONNX Runtime forward of the written file (``--check``);
3. ONNX Runtime's ``MatMulNBitsQuantizer`` (RTN, block 32, symmetric, accuracy level 4) loads
   the FP32 file, quantizes and saves it (timed: load + quantize + save).

Targets (issue 25): our peak RSS <= 1.5x the FP32 weights, our time <= 2x ORT's.

    python tests/benchmarks/bench_scale.py [--model 0.54b|1.1b] [--layers N]
        [--weight-method rtn|gptq] [--check]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

GIB = 1024**3
SHAPES = {
    "0.54b": {"layers": 9, "heads": 16, "kv_heads": 4},
    "1.1b": {"layers": 22, "heads": 32, "kv_heads": 4},
}
HIDDEN, INTERMEDIATE, VOCAB = 2048, 5632, 32000
CALIB_BATCHES, TOKENS = 4, 64
BLOCK_SIZE = 32


def peak_rss_bytes() -> int:
    """This process's peak resident set size since it started or since ``reset_peak_rss``
    (``VmHWM``; ``ru_maxrss`` where /proc is missing)."""
    try:
        return _status_kib("VmHWM") * 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"no {key} in /proc/self/status")


def reset_peak_rss() -> None:
    """Start the peak anew from the current resident size (Linux: clear_refs 5), so that the
    model's construction (transformers' random init) is not counted as our peak."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def build_model(name: str, layers: int | None):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = SHAPES[name]
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=layers or shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        use_cache=False,
    )
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config).eval()


def token_batches(count: int, seed: int) -> list[dict]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(0, VOCAB, (1, TOKENS), generator=generator),
            "attention_mask": torch.ones(1, TOKENS, dtype=torch.long),
        }
        for _ in range(count)
    ]


def fingerprint(model) -> float:
    """A checksum of the weights: the processes must see the same ones."""
    import torch

    with torch.no_grad():
        return float(sum(p.double().sum() for p in model.parameters()))


def role_write_fp32(args) -> dict:
    from workbench.runtime.onnx_export import export_fp32_onnx

    model = build_model(args.model, args.layers)
    example = token_batches(1, seed=2)[0]
    start = time.perf_counter()
    export_fp32_onnx(model, args.out, example, dynamic_batch=True)
    return {
        "fp32_weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "parameters": sum(p.numel() for p in model.parameters()),
        "fingerprint": fingerprint(model),
        "export_s": time.perf_counter() - start,
        "peak_rss_bytes": peak_rss_bytes(),
    }


def role_ours(args) -> dict:
    import workbench as wb

    model = build_model(args.model, args.layers)
    print_fingerprint = fingerprint(model)
    calib = token_batches(CALIB_BATCHES, seed=1)
    example = token_batches(1, seed=2)[0]
    config = wb.QuantConfig.preset(f"int4-weight-g{BLOCK_SIZE}", weight_method=args.weight_method)
    build_peak = peak_rss_bytes()
    reset_peak_rss()  # from here: the user's model resident, then wb.ptq + export_onnx
    rss_model = rss_bytes()
    start = time.perf_counter()
    result = wb.ptq(model, calib, config=config, progress=False)
    ptq_s = time.perf_counter() - start
    start = time.perf_counter()
    result.export_onnx(args.out, example, check_fusion=False)
    export_s = time.perf_counter() - start
    out = {
        "fingerprint": print_fingerprint,
        "ptq_s": ptq_s,
        "export_s": export_s,
        "peak_rss_model_bytes": rss_model,
        "build_peak_rss_bytes": build_peak,
        "peak_rss_bytes": peak_rss_bytes(),
        "summary": {k: v for k, v in result.report.summary.items() if _plain(v)},
        "stage_seconds": result.report.summary.get("stage_seconds"),
        "stage_threads": result.report.summary.get("stage_threads"),
    }
    if args.check:
        import numpy as np

        from workbench.runtime.ort_session import make_session, run_session

        start = time.perf_counter()
        fusion = result.fusion(args.out, warn=False)
        out["fusion_s"] = time.perf_counter() - start
        out["fusion"] = fusion.summary_text()
        start = time.perf_counter()
        session = make_session(args.out, threads=None)
        (logits,) = run_session(session, example)[:1]
        out["forward_s"] = time.perf_counter() - start
        import torch

        with torch.no_grad():
            simulated = result.model(**example).logits.numpy()
        a, b = logits.reshape(-1).astype(np.float64), simulated.reshape(-1).astype(np.float64)
        out["ort_vs_simulation_cosine"] = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
        out["peak_rss_checked_bytes"] = peak_rss_bytes()
    return out


def _plain(value) -> bool:
    return isinstance(value, int | float | str | bool | type(None))


def role_ort(args) -> dict:
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    start = time.perf_counter()
    config = DefaultWeightOnlyQuantConfig(
        block_size=BLOCK_SIZE, is_symmetric=True, accuracy_level=4
    )
    quantizer = MatMulNBitsQuantizer(onnx.load(args.fp32), algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(args.out, use_external_data_format=True)
    elapsed = time.perf_counter() - start
    nbits = sum(n.op_type == "MatMulNBits" for n in quantizer.model.model.graph.node)
    return {"time_s": elapsed, "peak_rss_bytes": peak_rss_bytes(), "matmulnbits": nbits}


def run_role(role: str, args, **extra) -> dict:
    command = [sys.executable, __file__, "--role", role, "--model", args.model]
    command += ["--weight-method", args.weight_method]
    if args.layers:
        command += ["--layers", str(args.layers)]
    if args.check:
        command.append("--check")
    for key, value in extra.items():
        command += [f"--{key}", str(value)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"{role} failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def dir_bytes(path: Path, stem: str) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.name.startswith(stem))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="0.54b")
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers")
    parser.add_argument("--weight-method", choices=["rtn", "gptq"], default="rtn")
    parser.add_argument("--check", action="store_true", help="fusion + one ORT forward too")
    parser.add_argument("--role", choices=["fp32", "ours", "ort"], default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--fp32", default=None)
    args = parser.parse_args()
    if args.role is not None:
        role = {"fp32": role_write_fp32, "ours": role_ours, "ort": role_ort}[args.role]
        print(json.dumps(role(args)))
        return 0

    from models import machine_line, print_checks

    print(machine_line())
    layers = args.layers or SHAPES[args.model]["layers"]
    print(
        f"model: LLaMA-shaped {args.model}, {layers} layers, hidden {HIDDEN}, "
        f"{CALIB_BATCHES} calibration batches of {TOKENS} tokens, int4-weight-g{BLOCK_SIZE}, "
        f"weight_method={args.weight_method}"
    )
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        fp32 = run_role("fp32", args, out=tmp / "fp32.onnx")
        ours = run_role("ours", args, out=tmp / "ours.onnx")
        ort = run_role("ort", args, fp32=tmp / "fp32.onnx", out=tmp / "ort.onnx")
        sizes = {name: dir_bytes(tmp, name) for name in ("fp32", "ours", "ort")}
    if abs(fp32["fingerprint"] - ours["fingerprint"]) > 1e-6 * abs(fp32["fingerprint"]) + 1e-3:
        raise SystemExit("the two processes built different weights")
    weights = fp32["fp32_weight_bytes"]
    ours_s = ours["ptq_s"] + ours["export_s"]
    print(
        f"FP32 weights: {fp32['parameters'] / 1e9:.2f} B parameters, {weights / GIB:.2f} GiB "
        f"(FP32 file written in {fp32['export_s']:.1f} s, writer peak "
        f"{fp32['peak_rss_bytes'] / GIB:.2f} GiB)"
    )
    print(
        f"files: FP32 {sizes['fp32'] / GIB:.2f} GiB, ours {sizes['ours'] / GIB:.2f} GiB, "
        f"ORT's {sizes['ort'] / GIB:.2f} GiB"
    )
    print()
    print("| | wall time | peak RSS | peak / FP32 weights |")
    print("|---|---|---|---|")
    print(
        f"| ours: wb.ptq {ours['ptq_s']:.1f} s + export_onnx {ours['export_s']:.1f} s "
        f"| {ours_s:.1f} s | {ours['peak_rss_bytes'] / GIB:.2f} GiB "
        f"| {ours['peak_rss_bytes'] / weights:.2f}x |"
    )
    print(
        f"| ORT MatMulNBitsQuantizer (load + quantize + save, {ort['matmulnbits']} MatMulNBits) "
        f"| {ort['time_s']:.1f} s | {ort['peak_rss_bytes'] / GIB:.2f} GiB "
        f"| {ort['peak_rss_bytes'] / weights:.2f}x |"
    )
    print(
        f"\nour process after building the model (before wb.ptq): "
        f"{ours['peak_rss_model_bytes'] / GIB:.2f} GiB resident (its peak while transformers "
        f"built it, not counted above: {ours.get('build_peak_rss_bytes', 0) / GIB:.2f} GiB)"
    )
    print(f"our stages (s): {ours.get('stage_seconds')}")
    print(
        f"torch threads per stage (fewer where other processes kept CPUs busy): "
        f"{ours.get('stage_threads')}"
    )
    if args.check:
        print(
            f"then fusion {ours['fusion_s']:.1f} s ({ours['fusion']}); one ORT forward "
            f"(session + run) {ours['forward_s']:.1f} s, ORT vs simulation cosine "
            f"{ours['ort_vs_simulation_cosine']:.5f}; peak RSS with them "
            f"{ours['peak_rss_checked_bytes'] / GIB:.2f} GiB"
        )
    for key in ("peak_memory_bytes", "stage_seconds", "layer_errors_on"):
        if key in ours["summary"]:
            print(f"summary {key}: {ours['summary'][key]}")
    print()
    return print_checks(
        [
            (
                "peak RSS / FP32 weights <= 1.5",
                ours["peak_rss_bytes"] / weights,
                ours["peak_rss_bytes"] <= 1.5 * weights,
            ),
            ("our time / ORT's <= 2", ours_s / ort["time_s"], ours_s <= 2 * ort["time_s"]),
        ],
        digits=2,
    )


if __name__ == "__main__":
    raise SystemExit(main())
