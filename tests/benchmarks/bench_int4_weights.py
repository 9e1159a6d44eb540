"""LLaMA-architecture decoder (6 layers, hidden 512, vocabulary 8192; random weights from a
transformers config) at ``int4-weight-g32`` with its embedding table quantized: our file
against FP32 and against ONNX Runtime's own ``MatMulNBitsQuantizer`` (RTN, block size 32,
symmetric, accuracy level 4) of the same FP32 file, on a one-token forward (batch 1).

Targets: file <= 0.2x FP32; every Linear a MatMulNBits in ONNX Runtime's optimized graph;
one-token latency >= 2x faster than FP32 and at least as fast as the MatMulNBitsQuantizer file.

    python tests/benchmarks/bench_int4_weights.py [--runs 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
from models import machine_line, print_checks

import workbench as wb
from workbench.runtime.onnx_export import export_fp32_onnx, export_int8_onnx
from workbench.runtime.ort_session import make_session, run_session

VOCAB = 8192


def llama_decoder(seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=256,
        use_cache=False,
    )
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config).eval()


def tokens(count: int, length: int, seed: int) -> list[dict]:
    """Random ids with their attention mask (transformers 5's TorchScript export needs it)."""
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(0, VOCAB, (1, length), generator=generator),
            "attention_mask": torch.ones(1, length, dtype=torch.long),
        }
        for _ in range(count)
    ]


def ort_matmul_nbits(fp32_path: Path, out_path: Path, block_size: int) -> Path:
    """ONNX Runtime's own 4-bit weight quantizer (RTN) of the FP32 file."""
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    config = DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=True, accuracy_level=4
    )
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # one line a node
    quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32_path)), algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out_path), use_external_data_format=False)
    return out_path


def kernel_count(path: Path, workdir: Path) -> dict[str, int]:
    import onnx

    optimized = workdir / f"{path.stem}.optimized.onnx"
    make_session(path, optimized_path=optimized)
    counts: dict[str, int] = {}
    for node in onnx.load(str(optimized)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    print(machine_line())

    model = llama_decoder()
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    calib = tokens(2, 32, seed=1)
    one_token = tokens(1, 1, seed=2)[0]
    config = wb.QuantConfig.preset("int4-weight-g32", quantize_embeddings=True)
    start = time.perf_counter()
    result = wb.ptq(model, calib, config=config, progress=False)
    print(f"PTQ: {time.perf_counter() - start:.1f} s, {result.report.summary_text()}")
    storage_total = int(result.report.storage.set_index("layer").loc["TOTAL", "total_bytes"])

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # one-token graphs (the sequence length is static in the TorchScript export)
        ours, _ = export_int8_onnx(result.model, tmp / "llama_int4.onnx", one_token)
        fp32 = export_fp32_onnx(result.fp32_model, tmp / "llama_fp32.onnx", one_token)
        peer = ort_matmul_nbits(fp32, tmp / "llama_ort_nbits.onnx", block_size=32)
        sizes = {
            name: os.path.getsize(p) for name, p in [("fp32", fp32), ("ours", ours), ("ort", peer)]
        }
        kernels = kernel_count(ours, tmp)
        peer_kernels = kernel_count(peer, tmp)
        fusion = result.fusion(ours, warn=False)
        print(f"\nfusion: {fusion.summary_text()}")
        print(
            f"our optimized graph: {kernels.get('MatMulNBits', 0)} MatMulNBits of {linears} "
            f"Linear layers; ORT MatMulNBitsQuantizer's: {peer_kernels.get('MatMulNBits', 0)}"
        )
        with torch.no_grad():
            simulated = result.model(**one_token).logits.numpy()
        (logits,) = run_session(make_session(ours), one_token)[:1]
        a, b = logits.reshape(-1).astype(np.float64), simulated.reshape(-1).astype(np.float64)
        cosine = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
        print(f"ONNX Runtime vs simulation, one-token logits: cosine {cosine:.6f}")

        bench = wb.benchmark(
            fp32,
            ours,
            one_token,
            threads=args.threads,
            warmup=args.warmup,
            runs=args.runs,
            others={"ort MatMulNBitsQuantizer": peer},
        )
    table = bench.table.set_index("model")
    print(f"\n{bench!r}\n")
    ours_ms = float(table.loc["int8", "latency_p50_ms"])
    peer_ms = float(table.loc["ort MatMulNBitsQuantizer", "latency_p50_ms"])
    print(
        f"sizes: FP32 {sizes['fp32'] / 1e6:.1f} MB, ours {sizes['ours'] / 1e6:.2f} MB "
        f"(storage table {storage_total / 1e6:.2f} MB), ORT MatMulNBitsQuantizer "
        f"{sizes['ort'] / 1e6:.2f} MB (embedding FP32)"
    )
    table_gap = abs(sizes["ours"] / storage_total - 1)
    checks = [
        ("|file / storage table - 1| <= 0.02", table_gap, table_gap <= 0.02),
        (
            "file / FP32 file <= 0.2",
            sizes["ours"] / sizes["fp32"],
            sizes["ours"] <= 0.2 * sizes["fp32"],
        ),
        (
            "Linear layers not on MatMulNBits == 0",
            linears - kernels.get("MatMulNBits", 0),
            kernels.get("MatMulNBits", 0) == linears,
        ),
        ("one-token speedup vs FP32 >= 2.0", bench.speedup, bench.speedup >= 2.0),
        (
            "one-token speed vs ORT MatMulNBitsQuantizer >= 1.0",
            peer_ms / ours_ms,
            peer_ms / ours_ms >= 1.0,
        ),
        ("ORT vs simulation logits cosine >= 0.999", cosine, cosine >= 0.999),
    ]
    return print_checks(checks, digits=4)


if __name__ == "__main__":
    sys.exit(main())
