"""QAT against PTQ on the digits demo: accuracy side by side, and QAT's step time against FP32.

    python tests/benchmarks/bench_qat.py [--seeds 5] [--repeats 7]

Prints, for each model and config, the test accuracy of FP32, PTQ, QAT (weight qparams
following the weight) and QAT with LSQ-learned scales, how many points PTQ loses and which
share of that QAT wins back ((QAT - PTQ) / (FP32 - PTQ)), averaged over ``--seeds`` training
seeds of the FP32 model. The demo CNN loses almost nothing to PTQ at 4 bits, so harder cases
are added and named as such: 3- and 2-bit schemes on the demo CNN, and a 4x narrower CNN
(4 channels) at 4 and 3 bits.

Then the time of one training step (forward, loss, backward, Adam step) of QAT's own loop
against a plain FP32 loop on the same batches, interleaved in one run, one thread, the
median of ``--repeats`` epochs each.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import pandas as pd
import torch
from torch import nn

import workbench as wb
from workbench.demo import DigitsCNN, accuracy, load_digits_data
from workbench.engine.calibration.calibrate import calibrate, finish_calibration, prepare_model
from workbench.engine.quantizers.qat import enable_qat
from workbench.engine.training.options import build_optimizer
from workbench.engine.training.train import train_qat

CE = nn.CrossEntropyLoss()


def scheme_config(weight_bits: int, activation_bits: int | None) -> wb.QuantConfig:
    activation = None if activation_bits is None else wb.Scheme(activation_bits, False, False)
    return wb.QuantConfig(weight=wb.Scheme(weight_bits, True, True, 0), activation=activation)


# (model, config label, config, QAT epochs, QAT lr)
CASES = [
    ("demo CNN", "int8", "int8", 2, 1e-4),
    ("demo CNN", "int4-weight", "int4-weight", 3, 1e-3),
    ("demo CNN", "w4a4", "w4a4", 3, 1e-3),
    ("demo CNN", "w3a3 (harder)", scheme_config(3, 3), 3, 1e-3),
    ("demo CNN", "w2a8 (harder)", scheme_config(2, 8), 3, 1e-3),
    ("demo CNN", "w2a4 (harder)", scheme_config(2, 4), 3, 1e-3),
    ("narrow CNN", "int4-weight", "int4-weight", 3, 1e-3),
    ("narrow CNN", "w4a4", "w4a4", 3, 1e-3),
    ("narrow CNN", "w3a3 (harder)", scheme_config(3, 3), 3, 1e-3),
]
CHANNELS = {"demo CNN": 16, "narrow CNN": 4}
NEGLIGIBLE_LOSS_PP = 0.25  # about one test image in 450: below it the ratio is noise


def train_fp32(data, channels: int, seed: int, epochs: int = 10) -> nn.Module:
    """The demo recipe (Adam 3e-3, batch 64), for any width."""
    torch.manual_seed(seed)
    model = DigitsCNN(channels)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for images, labels in data.train_loader():
            optimizer.zero_grad()
            CE(model(images), labels).backward()
            optimizer.step()
    return model.eval()


def accuracy_table(data, seeds: int) -> pd.DataFrame:
    def eval_fn(model):
        return accuracy(model, data.test_x, data.test_y)

    rows = []
    for model_name, label, config, epochs, lr in CASES:
        runs = []
        for seed in range(seeds):
            model = train_fp32(data, CHANNELS[model_name], seed)
            ptq = wb.ptq(model, data.calib_batches(), config=config, progress=False)
            options = {"config": config, "loss_fn": CE, "epochs": epochs, "lr": lr}
            qat = wb.qat(model, data.train_loader(), progress=False, **options)
            lsq = wb.qat(model, data.train_loader(), learn_scales=True, progress=False, **options)
            runs.append(
                [eval_fn(model), eval_fn(ptq.model), eval_fn(qat.model), eval_fn(lsq.model)]
            )
        fp32, ptq_acc, qat_acc, lsq_acc = (
            statistics.mean(column) for column in zip(*runs, strict=True)
        )
        lost = fp32 - ptq_acc
        recovered = (qat_acc - ptq_acc) / lost if lost >= NEGLIGIBLE_LOSS_PP else float("nan")
        recovered_lsq = (lsq_acc - ptq_acc) / lost if lost >= NEGLIGIBLE_LOSS_PP else float("nan")
        rows.append(
            {
                "model": model_name,
                "config": label,
                "qat": f"{epochs} ep, lr {lr:g}",
                "fp32_%": fp32,
                "ptq_%": ptq_acc,
                "qat_%": qat_acc,
                "qat_lsq_%": lsq_acc,
                "ptq_loss_pp": lost,
                "qat_recovered": recovered,
                "lsq_recovered": recovered_lsq,
            }
        )
        print(f"  done: {model_name}, {label}", flush=True)
    return pd.DataFrame(rows)


def qat_training_model(model, data, config, learn_scales):
    calib = data.calib_batches()
    _, prepared, plans = prepare_model(model, calib[0], wb.QuantConfig.preset(config))
    finish_calibration(prepared, plans, calibrate(prepared, calib, progress=False))
    enable_qat(prepared, learn_scales)
    return prepared


def step_times(data, repeats: int) -> pd.DataFrame:
    """Seconds per step of QAT's loop (``engine.training.train.train_qat``) against a plain FP32
    loop:
    the model as the user trains it (BatchNorm in training mode, the target's baseline), and
    with BatchNorm folded as QAT trains it (the cost of fake quantization alone)."""
    model = train_fp32(data, 16, seed=0, epochs=2)
    batches = list(data.train_loader())
    device = torch.device("cpu")

    def fp32_runner(fp32_model):
        fp32_model.train()
        optimizer = torch.optim.Adam(fp32_model.parameters(), lr=1e-4)

        def epoch():
            for images, labels in batches:
                optimizer.zero_grad(set_to_none=True)
                loss = CE(fp32_model(images), labels)
                float(loss.detach())
                loss.backward()
                optimizer.step()

        return epoch

    folded, _, _ = prepare_model(model, batches[0], wb.QuantConfig())
    runners = {"FP32": fp32_runner(copy.deepcopy(model)), "FP32, BN folded": fp32_runner(folded)}
    for label, config, learn in [
        ("QAT int8", "int8", False),
        ("QAT int8, LSQ scales", "int8", True),
        ("QAT w4a4", "w4a4", False),
    ]:
        qat_model = qat_training_model(model, data, config, learn)
        optimizer = build_optimizer(None, qat_model, 1e-4)

        def qat_epoch(qat_model=qat_model, optimizer=optimizer):
            train_qat(qat_model, lambda: iter(batches), CE, optimizer, 1, device, progress=False)

        runners[label] = qat_epoch
    timings = {label: [] for label in runners}
    for run in runners.values():  # warm-up
        run()
    for _ in range(repeats):
        for label, run in runners.items():
            start = time.perf_counter()
            run()
            timings[label].append((time.perf_counter() - start) / len(batches))
    fp32_ms = 1e3 * statistics.median(timings["FP32"])
    folded_ms = 1e3 * statistics.median(timings["FP32, BN folded"])
    rows = []
    for label, values in timings.items():
        step_ms = 1e3 * statistics.median(values)
        rows.append(
            {
                "loop": label,
                "step_ms": step_ms,
                "ratio_to_fp32": step_ms / fp32_ms,
                "ratio_to_fp32_bn_folded": step_ms / folded_ms,
            }
        )
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="FP32 models trained per case")
    parser.add_argument("--repeats", type=int, default=7, help="timed epochs per loop")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_digits_data()
    print(f"digits: {len(data.train_y)} train / {len(data.test_y)} test images, 1 thread")
    table = accuracy_table(data, args.seeds)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(
            f"\nTest accuracy, mean of {args.seeds} FP32 seeds (recovered = (QAT-PTQ)/(FP32-PTQ);"
        )
        print(f"n/a where PTQ loses < {NEGLIGIBLE_LOSS_PP} pp):")
        print(table.to_string(index=False, float_format="{:.2f}".format, na_rep="n/a"))
        times = step_times(data, args.repeats)
        print("\nTraining step time on the demo CNN (batch 64, Adam), median of repeats:")
        print(times.to_string(index=False, float_format="{:.2f}".format))


if __name__ == "__main__":
    main()
