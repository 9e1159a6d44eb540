"""QAT of the digits CNN on several processes: the same table as one process.

    torchrun --nproc_per_node 2 -m workbench.examples.qat_ddp [--epochs 2] [--batch-size 32]
    accelerate launch --num_processes 2 -m workbench.examples.qat_ddp
    python -m workbench.examples.qat_ddp            # one process, for comparison

Launched by ``torchrun`` / ``accelerate launch`` (``RANK`` and ``WORLD_SIZE`` set), each
process joins the process group (gloo on the CPU, NCCL with ``--device cuda``); ``wb.qat``
sees it and shards the training DataLoader, combines the calibration statistics and trains
under DistributedDataParallel. ``--batch-size`` is per process: with two processes pass half
the one-process batch to train on the same samples per step. Rank 0 prints the table and
writes the export; every process returns the same model.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
from torch import nn

import workbench as wb
from workbench.demo import accuracy, load_digits_data, train_digits_cnn


def join_launcher_group(device: str) -> bool:
    """Join the process group a launcher describes (``RANK`` / ``WORLD_SIZE`` in the
    environment); False when started as one plain process."""
    if "RANK" not in os.environ or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend)
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return True


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--config", default="w4a4")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=None, help="where rank 0 writes the ONNX")
    args = parser.parse_args(argv)
    distributed = join_launcher_group(args.device)
    rank = dist.get_rank() if distributed else 0
    processes = dist.get_world_size() if distributed else 1
    torch.manual_seed(0)
    data = load_digits_data()
    model = train_digits_cnn(data, epochs=4)  # same seed: the same model on every process

    def test_accuracy(m: nn.Module) -> float:
        return accuracy(m.to("cpu"), data.test_x, data.test_y)

    result = wb.qat(
        model,
        data.train_loader(batch_size=args.batch_size, shuffle=True),
        config=args.config,
        loss_fn=nn.CrossEntropyLoss(),
        epochs=args.epochs,
        lr=args.lr,
        device=args.device,
        progress=rank == 0,
    )
    ptq = wb.ptq(model, data.calib_batches(), config=args.config, progress=False)
    table = pd.DataFrame(
        [
            {"model": "FP32", "accuracy_pct": test_accuracy(model)},
            {"model": f"PTQ {args.config}", "accuracy_pct": test_accuracy(ptq.model)},
            {"model": f"QAT {args.config}", "accuracy_pct": test_accuracy(result.model)},
        ]
    )
    out = args.out or Path(tempfile.gettempdir()) / "digits_qat_int8.onnx"
    written = result.export_onnx(out, data.test_x[:1], check_fusion=False)  # rank 0 writes
    if rank == 0:
        print(
            f"\nQAT of the digits CNN on {processes} process(es), batch {args.batch_size} "
            f"per process, {len(result.history)} steps:"
        )
        print(table.round(2).to_string(index=False))
        print(f"\nINT8 model written to {written}")
    if distributed:
        dist.destroy_process_group()
    return table


if __name__ == "__main__":
    main()
