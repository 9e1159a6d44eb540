"""Our GPTQ int4 ONNX Runtime GenAI folder against onnxruntime-genai's own RTN int4 build.

    python tests/benchmarks/bench_genai.py [--train-steps 300] [--checkpoint llama.pt]

A LLaMA-architecture byte-level decoder (``transformers`` LlamaConfig: hidden 512, 4 layers,
8 heads, 4 key/value heads, MLP 1408, 264-entry vocabulary: 256 bytes and an unused end
token at 256, inside the vocabulary as ``og.Generator`` needs) is trained here for
``--train-steps`` steps on the Python standard library's own source files (every tenth file
held out; nothing is downloaded). Then, from the same FP32 weights:

* ``builder fp32``: ``python -m onnxruntime_genai.models.builder -p fp32`` on the FP32 checkpoint;
* ``builder rtn int4``: the builder's own int4 (``-p int4``: round-to-nearest, symmetric,
  blocks of 32, ``accuracy_level`` 4, LM head quantized, embeddings FP32);
* ``ours gptq int4``: ``wb.ptq`` with GPTQ at 4 bits in blocks of 32 (LM head quantized,
  embeddings FP32) -> ``res.export_genai`` (our GPTQ checkpoint through the same builder).

Printed, all in one run: decode tokens/s and prefill time (``wb.generation_benchmark``, runs
alternating between folders), then our decode tokens/s over the builder's RTN in ``--rounds``
interleaved rounds (which folder goes first alternates; median, min and max of the ratio),
file sizes, greedy agreement of our folder with the simulated
model over 8 held-out prompts (32 tokens), and perplexity per byte on held-out windows
computed on ONNX Runtime GenAI (full-window logits of each folder). Done when: decode >= 0.95x
the builder's RTN, file within 5 %, greedy agreement >= 90 % of positions (or logits cosine
>= 0.999 where they first differ), GPTQ's perplexity increase at most half of RTN's.

Our folder's ``MatMulNBits`` nodes have one input more than the builder's RTN ones (zero
points): the builder's GPTQ loader dequantizes with ``zeros * scales`` and so needs ``qzeros``
even for symmetric weights (there all 8, the value ``MatMulNBits`` assumes without the input),
and it passes them on.
"""

from __future__ import annotations

import argparse
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from byte_text import stdlib_bytes, train_lm
from byte_text import windows as byte_windows
from models import machine_line

import workbench as wb

CONTEXT = 128
VOCAB = 264  # 256 bytes, then an end token (256) and padding rows to a multiple of 8
END_TOKEN = 256


def windows(data: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    return byte_windows(data, count, generator, CONTEXT)


def byte_tokenizer():
    """Byte-level tokenizer: id = byte value (GPT-2's byte-to-character map, no merges), an
    end token at 256."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = _bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    vocab["</s>"] = END_TOKEN
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", bos_token="</s>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ByteLevel uses)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def llama(hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75) // 32 * 32,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=END_TOKEN,
        eos_token_id=END_TOKEN,
        pad_token_id=END_TOKEN,
    )
    return LlamaForCausalLM(config)


def train(model, data: torch.Tensor, steps: int, batch_size: int) -> None:
    train_lm(model, data, steps, batch_size, CONTEXT, peak_lr=1e-3, warmup_steps=30, log_every=50)


def build(checkpoint: Path, out: Path, precision: str) -> float:
    start = time.perf_counter()
    cache = out.parent / f"cache_{out.name}"
    cache.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder"]
    command += ["-i", str(checkpoint), "-o", str(out), "-p", precision, "-e", "cpu"]
    command += ["-c", str(cache)]
    subprocess.run(command, check=True, capture_output=True, cwd=str(cache))
    return time.perf_counter() - start


def decode_ratios(folders: dict, prompt_ids: list, rounds: int) -> list[float]:
    """Decode tokens/s of our folder over the builder's RTN build, one ratio per round: each
    round times both folders on every prompt, alternating which goes first, so load on the
    shared machine falls on both alike; the median over rounds is the figure."""
    pair = ["builder rtn int4", "ours gptq int4"]
    ratios = []
    for round_index in range(rounds):
        order = pair if round_index % 2 == 0 else pair[::-1]
        bench = wb.generation_benchmark(
            {label: folders[label] for label in order}, prompt_ids, new_tokens=64, runs=1
        )
        rows = bench.table.set_index("model")["decode_tokens_per_s"]
        ratios.append(float(rows["ours gptq int4"] / rows["builder rtn int4"]))
    return ratios


def genai_perplexity(folder: Path, batches: list[torch.Tensor]) -> float:
    """exp(mean next-byte cross-entropy) from the folder's full-window logits on ORT GenAI."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    total, count = 0.0, 0
    for batch in batches:
        for row in batch:
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=CONTEXT + 1)
            generator = og.Generator(model, params)
            generator.append_tokens(row.numpy()[None].astype(np.int32))
            logits = torch.from_numpy(np.asarray(generator.get_output("logits"))[0]).float()
            total += float(F.cross_entropy(logits[:-1], row[1:], reduction="sum"))
            count += len(row) - 1
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved decode-speed rounds")
    parser.add_argument("--checkpoint", type=Path, help="reuse (or save) the trained weights")
    parser.add_argument("--workdir", type=Path, help="keep the folders here")
    parser.add_argument("--act-order", action="store_true", help="GPTQ with act-order")
    parser.add_argument("--asymmetric", action="store_true", help="asymmetric GPTQ weights")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{machine_line()}; torch threads {args.threads}")

    train_data, held_out_data = stdlib_bytes()
    model = llama(args.hidden, args.layers)
    params = sum(p.numel() for p in model.parameters())
    print(f"LLaMA hidden {args.hidden}, {args.layers} layers: {params / 1e6:.1f} M parameters")
    if args.checkpoint is not None and args.checkpoint.exists():
        model.load_state_dict(torch.load(args.checkpoint))
        model.eval()
        print(f"weights from {args.checkpoint}")
    else:
        start = time.perf_counter()
        train(model, train_data, args.train_steps, args.batch_size)
        print(f"trained {args.train_steps} steps in {time.perf_counter() - start:.0f} s")
        if args.checkpoint is not None:
            torch.save(model.state_dict(), args.checkpoint)

    tokenizer = byte_tokenizer()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_genai_"))
    work.mkdir(parents=True, exist_ok=True)
    fp32_checkpoint = work / "fp32_checkpoint"
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(fp32_checkpoint)
    tokenizer.save_pretrained(fp32_checkpoint)
    folders = {"builder fp32": work / "builder_fp32", "builder rtn int4": work / "builder_rtn"}
    for (label, folder), precision in zip(folders.items(), ("fp32", "int4"), strict=True):
        seconds = build(fp32_checkpoint, folder, precision)
        print(f"{label}: built in {seconds:.0f} s")

    generator = torch.Generator().manual_seed(1)
    calib = [windows(train_data, 16, generator) for _ in range(8)]
    config = wb.QuantConfig(
        weight=wb.Scheme(4, not args.asymmetric, True, 0, group_size=32),
        activation=None,
        weight_method="gptq",
        gptq_act_order=args.act_order,
        quantize_embeddings=False,
    )
    start = time.perf_counter()
    res = wb.ptq(model, calib, config=config, progress=False)
    ptq_s = time.perf_counter() - start
    start = time.perf_counter()
    ours = res.export_genai(work / "ours_gptq", tokenizer)
    export_s = time.perf_counter() - start
    folders["ours gptq int4"] = ours
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"ours gptq int4 ({config.weight.describe()}, act-order {args.act_order}): wb.ptq "
        f"{ptq_s:.0f} s, export_genai {export_s:.0f} s; peak RSS {peak_gib:.1f} GiB"
    )

    prompt_ids = [windows(held_out_data, 1, generator)[0, :32].tolist() for _ in range(8)]
    bench = wb.generation_benchmark(folders, prompt_ids, new_tokens=64, runs=1)
    print("\n" + repr(bench))
    speeds = decode_ratios(folders, prompt_ids, args.rounds)
    speed = float(np.median(speeds))
    print(
        f"\ndecode tokens/s ours / builder RTN over {args.rounds} interleaved rounds "
        f"(order alternating): median {speed:.3f}, min {min(speeds):.3f}, max {max(speeds):.3f}"
    )
    rows = bench.table.set_index("model")
    size = rows.loc["ours gptq int4", "file_mb"] / rows.loc["builder rtn int4", "file_mb"]

    parity = res.generation_parity(ours, prompt_ids, new_tokens=32)
    print("\ngreedy tokens, ours gptq int4 folder vs the simulated model:")
    print(parity.table.to_string(index=False))
    print(parity.summary_text())
    differ = parity.table["first_difference"].notna()
    agreement_ok = parity.agreement >= 0.9 or bool(
        (parity.table.loc[differ, "cosine_there"] >= 0.999).all()
    )

    held_out = list(windows(held_out_data, args.eval_windows, generator).split(16))
    ppl = {label: genai_perplexity(Path(folder), held_out) for label, folder in folders.items()}
    print(f"\nperplexity per byte on ORT GenAI, {args.eval_windows} held-out windows")
    for label, value in ppl.items():
        print(f"  {label:<18}{value:8.4f}  increase {value - ppl['builder fp32']:+.4f}")
    rtn_increase = ppl["builder rtn int4"] - ppl["builder fp32"]
    gptq_increase = ppl["ours gptq int4"] - ppl["builder fp32"]
    share = gptq_increase / rtn_increase if rtn_increase > 0 else float("nan")

    print("\nDone when:")
    print(
        f"  decode tokens/s ours / builder RTN = {speed:.3f} (median of {args.rounds} rounds; "
        f">= 0.95): {speed >= 0.95}"
    )
    print(f"  file size ours / builder RTN = {size:.3f} (within 5 %): {abs(size - 1) <= 0.05}")
    print(f"  greedy agreement {parity.agreement:.0%} (>= 90 % or cosine >= 0.999): {agreement_ok}")
    print(f"  GPTQ increase / RTN increase = {share:.2f} (<= 0.5): {share <= 0.5}")
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"  folders: {work}; peak RSS {peak_gib:.1f} GiB")


if __name__ == "__main__":
    main()
