"""GPTQ against round-to-nearest (RTN) on a small GPT-2 trained here: perplexity per byte.

    python tests/benchmarks/bench_gptq_lm.py [--train-steps 1000] [--checkpoint gpt2.pt]

A GPT-2-architecture language model (``transformers`` GPT2Config: 4 layers, hidden 128,
4 heads, 128-byte context, byte-level tokens) is trained inside the script for
``--train-steps`` steps of 16 windows (0.3-0.5 s of CPU time a step; 2.5 s of wall time
on a loaded, shared machine) on the Python standard library's own source files (they ship with every
Python: nothing is downloaded); every tenth file is held out. Its weights are then quantized
(weight-only, FP32 activations; the tied LM head and the embeddings stay FP32, as in the GPTQ
paper) with round-to-nearest and with GPTQ (and GPTQ with act-order) at 4 and 3 bits, with
block-wise scales (group sizes 128 and 32). Calibration: 8 batches of 16 random 128-byte
windows of the training files (16k tokens). Printed: perplexity per byte on held-out
windows, its increase over FP32 and GPTQ's increase as a share of RTN's (the goal: at most
half at 4 bits, g128), the wall time of each ``wb.ptq`` call, and the CPU model.

GPT-2's projections are ``transformers``' ``Conv1D`` (weight ``[in, out]``), quantized as
the Linear they compute. One torch thread by default: on a shared 2-core machine two threads
ran a training step 5x slower than one.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from byte_text import stdlib_bytes, train_lm
from byte_text import windows as byte_windows
from models import machine_line

import workbench as wb

CONTEXT_BYTES = 128
CALIB_BATCHES, CALIB_BATCH_SIZE = 8, 16
EVAL_WINDOWS = 256


def windows(data: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    return byte_windows(data, count, generator, CONTEXT_BYTES)


# model ----------------------------------------------------------------------------------------
def small_gpt2(hidden: int, layers: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=256,
        n_positions=CONTEXT_BYTES,
        n_embd=hidden,
        n_layer=layers,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def train(model: nn.Module, data: torch.Tensor, steps: int, batch_size: int) -> None:
    train_lm(model, data, steps, batch_size, CONTEXT_BYTES, peak_lr=3e-3, warmup_steps=50)


@torch.no_grad()
def perplexity(model: nn.Module, batches: list[torch.Tensor]) -> float:
    """exp(mean cross-entropy per next byte) over the held-out windows."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        logits = model(input_ids=batch).logits[:, :-1]
        targets = batch[:, 1:]
        total += float(
            F.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1), reduction="sum")
        )
        count += targets.numel()
    return math.exp(total / count)


# quantization ---------------------------------------------------------------------------------
def weight_schemes(bits: int, symmetric: bool) -> list[tuple[str, wb.Scheme]]:
    """Block-wise weights in groups of 128 and of 32 inputs."""
    return [
        (f"{bits}-bit g{size}", wb.Scheme(bits, symmetric, True, 0, group_size=size))
        for size in (128, 32)
    ]


def quantized_perplexity(model, calib, held_out, scheme, method, act_order=False):
    config = wb.QuantConfig(
        weight=scheme,
        activation=None,
        exclude=("lm_head",),
        weight_method=method,
        gptq_act_order=act_order,
    )
    start = time.perf_counter()
    result = wb.ptq(model, calib, config=config, progress=False)
    seconds = time.perf_counter() - start
    rounded = sum(1 for plan in result.plans if plan.weight_rounding == method)
    return perplexity(result.model, held_out), seconds, rounded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-steps", type=int, default=1000)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--symmetric", action="store_true", help="symmetric weights (default asym)")
    parser.add_argument("--checkpoint", type=Path, help="reuse (or save) the trained weights")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{machine_line()}; torch threads {args.threads}")

    train_data, held_out_data = stdlib_bytes()
    print(
        f"text: {len(train_data) / 1e6:.1f} MB training, {len(held_out_data) / 1e6:.2f} MB held out"
    )
    model = small_gpt2(args.hidden, args.layers)
    if args.checkpoint is not None and args.checkpoint.exists():
        model.load_state_dict(torch.load(args.checkpoint))
        print(f"weights from {args.checkpoint}")
    else:
        start = time.perf_counter()
        train(model, train_data, args.train_steps, args.batch_size)
        print(f"trained {args.train_steps} steps in {time.perf_counter() - start:.0f} s")
        if args.checkpoint is not None:
            torch.save(model.state_dict(), args.checkpoint)
    model.eval()

    generator = torch.Generator().manual_seed(1)
    calib = [windows(train_data, CALIB_BATCH_SIZE, generator) for _ in range(CALIB_BATCHES)]
    held_out = list(windows(held_out_data, EVAL_WINDOWS, generator).split(32))
    fp32 = perplexity(model, held_out)
    print(f"\nperplexity per byte on {EVAL_WINDOWS} held-out windows of {CONTEXT_BYTES} bytes")
    print(f"{'weights':<22}{'method':<16}{'ppl':>8}{'increase':>10}{'vs RTN':>8}{'ptq s':>8}")
    print(f"{'fp32':<22}{'':<16}{fp32:8.3f}")
    sym = "sym" if args.symmetric else "asym"
    for bits in (4, 3):
        for label, scheme in weight_schemes(bits, args.symmetric):
            rtn_increase = None
            for method, act_order in (("nearest", False), ("gptq", False), ("gptq", True)):
                ppl, seconds, count = quantized_perplexity(
                    model, calib, held_out, scheme, method, act_order
                )
                increase = ppl - fp32
                name = "RTN" if method == "nearest" else "GPTQ act-order" if act_order else "GPTQ"
                share = "" if rtn_increase is None else f"{increase / rtn_increase:8.2f}"
                rtn_increase = increase if rtn_increase is None else rtn_increase
                print(
                    f"{label + ' ' + sym:<22}{name:<16}{ppl:8.3f}{increase:+10.3f}{share:>8}"
                    f"{seconds:8.1f}"
                )
    print(f"({count} Conv1D projections quantized; LM head and embeddings FP32)")


if __name__ == "__main__":
    main()
