"""Jobs of two CPU processes (gloo) running wb.ptq / wb.qat, for test_distributed.py.

``python distributed_jobs.py JOB OUT_DIR`` starts two processes (forked, so the data and the
model built here are shared), each joining a gloo process group and running JOB; each saves
what it got to ``OUT_DIR/rank<r>.pt``. The parent also saves the single-process reference
to ``OUT_DIR/single.pt`` where the job has one. Run in a subprocess with a timeout: a hang
fails the test instead of blocking it.
"""

from __future__ import annotations

import functools
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

import workbench as wb
from workbench.demo import DigitsCNN, accuracy
from workbench.demo import load_digits_data as load_digits_uncached
from workbench.engine.quantizers.modules import ActivationQuantizer

WORLD_SIZE = 2
OBSERVERS = ("minmax", "percentile", "mse", "entropy")
CALIB_BATCH = 32
QAT_BATCH_PER_RANK = 32
QAT_STEPS = 12


load_digits_data = functools.cache(load_digits_uncached)


def digits_model() -> nn.Module:
    """The digits CNN after one epoch of FP32 training (about 90% accurate): QAT then moves
    accuracy by little, so that one process and two are compared on a stable metric."""
    torch.manual_seed(0)
    data = load_digits_data()
    model = DigitsCNN(channels=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for images, labels in data.train_loader(batch_size=64):
        optimizer.zero_grad()
        loss_fn(model(images), labels).backward()
        optimizer.step()
    return model.eval()


def activation_qparams(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {
        name: (module.scale.detach().clone(), module.zero_point.detach().clone())
        for name, module in model.named_modules()
        if isinstance(module, ActivationQuantizer)
    }


def calib_batches() -> list[torch.Tensor]:
    images = load_digits_data().train_x
    count = len(images) // CALIB_BATCH
    return [images[i * CALIB_BATCH : (i + 1) * CALIB_BATCH] for i in range(count)]


def ptq_all(model: nn.Module, batches: list[torch.Tensor]) -> dict:
    out = {}
    for observer in OBSERVERS:
        config = wb.QuantConfig(observer=observer)
        result = wb.ptq(model, batches, config, progress=False)
        out[observer] = activation_qparams(result.model)
        out[f"{observer}_summary"] = result.report.summary
    return out


def qat_run(model: nn.Module, loader: DataLoader, out_dir: Path, rank: int | None) -> dict:
    data = load_digits_data()
    result = wb.qat(
        model,
        loader,
        loss_fn=nn.CrossEntropyLoss(),
        lr=1e-3,
        learn_scales=True,
        progress=False,
    )
    name = "single" if rank is None else f"rank{rank}"
    result.export_onnx(out_dir / f"{name}.onnx", data.test_x[:4], check_fusion=False)
    return {
        "state": {k: v.clone() for k, v in result.model.state_dict().items()},
        "accuracy": accuracy(result.model, data.test_x, data.test_y),
        "history_loss": result.history["loss"].tolist(),
        "writes_files": result.writes_files,
    }


def qat_loader(batch_size: int) -> DataLoader:
    data = load_digits_data()
    steps_samples = QAT_STEPS * QAT_BATCH_PER_RANK * WORLD_SIZE
    dataset = TensorDataset(data.train_x[:steps_samples], data.train_y[:steps_samples])
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


class StopOnRank1:
    """Cross-entropy, except that rank 1 raises ``error`` at its third training step."""

    def __init__(self, error: type[BaseException]) -> None:
        self.error, self.calls = error, 0
        self.loss = nn.CrossEntropyLoss()

    def __call__(self, output, target):
        self.calls += 1  # call 1 is qat's loss check before training
        if dist.get_rank() == 1 and self.calls == 4:
            raise self.error("stopped on purpose")
        return self.loss(output, target)


def run_rank(rank: int, job: str, out_dir: Path, model: nn.Module) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{out_dir / 'store'}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        if job == "calibration":
            result = ptq_all(model, calib_batches()[rank::WORLD_SIZE])
        elif job == "qat":  # passed as users of DDP hold it: wrapped
            wrapped = DistributedDataParallel(model)
            result = qat_run(wrapped, qat_loader(QAT_BATCH_PER_RANK), out_dir, rank)
        else:
            error = KeyboardInterrupt if job == "interrupt" else ValueError
            try:
                wb.qat(
                    model,
                    qat_loader(QAT_BATCH_PER_RANK),
                    loss_fn=StopOnRank1(error),
                    progress=False,
                )
                result = {"error": None}
            except BaseException as exc:  # what each process was told
                result = {"error": type(exc).__name__, "message": str(exc)}
                result["code"] = getattr(exc, "code", None)
                if job == "exception" and rank == 1:
                    # stay alive past the timeout: rank 0 must fail by the timeout, not
                    # because this process's connections closed
                    time.sleep(float(os.environ["WORKBENCH_DIST_TIMEOUT_S"]) + 5)
        torch.save(result, out_dir / f"rank{rank}.pt")
    except BaseException:
        traceback.print_exc()
        raise


def main(job: str, out_dir: Path) -> None:
    torch.set_num_threads(1)
    model = digits_model()
    mp.start_processes(run_rank, args=(job, out_dir, model), nprocs=WORLD_SIZE, start_method="fork")
    if job == "calibration":
        torch.save(ptq_all(model, calib_batches()), out_dir / "single.pt")
    elif job == "qat":
        loader = qat_loader(QAT_BATCH_PER_RANK * WORLD_SIZE)
        torch.save(qat_run(model, loader, out_dir, None), out_dir / "single.pt")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], Path(sys.argv[2]))
