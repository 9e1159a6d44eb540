"""Better PTQ without training, side by side on the digits: cross-layer equalization (CLE) and
bias correction (BC) against plain PTQ, and AdaRound against plain PTQ and QAT.

    python tests/benchmarks/bench_ptq_methods.py [--seeds 3] [--adaround-iterations 1000]

1. A MobileNetV2-style CNN (inverted residuals: 1x1 expand, 3x3 depthwise, 1x1 project, ReLU6,
   BatchNorm) trained on the digits upscaled to 32x32, per-tensor weights at 8, 6 and 5 bits
   (uint8 activations; at 8 bits plain PTQ loses nothing on this small model, so the lower
   widths are where CLE and BC have something to recover): test accuracy of FP32, plain PTQ,
   PTQ + CLE, PTQ + BC, PTQ + CLE + BC (empirical), PTQ + CLE + analytic BC, which share of
   the PTQ loss CLE + BC recover ((CLE+BC - PTQ) / (FP32 - PTQ)), on the mean and seed by
   seed, and the model output's SQNR against FP32 on the calibration batches.
2. The 4-channel digits CNN at w3a3 and a ResNet-style digits CNN at W4A8: plain PTQ,
   AdaRound (and AdaRound + BC), the share of the PTQ loss recovered, AdaRound's wall time
   (the whole ``wb.ptq`` call) against QAT's training time per epoch, and the QAT epoch (and
   time) that first reaches AdaRound's accuracy.

Every figure is the mean over ``--seeds`` FP32 training seeds; one thread; the CPU model is
printed. Where the PTQ loss is below a quarter of a point (one test image in 450) the recovered
share is noise and shown as n/a.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import BasicBlock, machine_line

import workbench as wb
from workbench.demo import DigitsCNN, accuracy, load_digits_data
from workbench.engine.algorithms.bias_correction import correct_biases
from workbench.engine.calibration.calibrate import calibrate, finish_calibration, prepare_model
from workbench.engine.quantizers.qat import enable_qat
from workbench.engine.training.options import build_optimizer
from workbench.engine.training.train import train_qat

CE = nn.CrossEntropyLoss()
NEGLIGIBLE_LOSS_PP = 0.25
QAT_EPOCHS, QAT_LR = 3, 1e-3


# models ---------------------------------------------------------------------------------------
class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        hidden = cin * expand
        self.residual = stride == 1 and cin == cout
        self.block = nn.Sequential(
            OrderedDict(
                expand=nn.Conv2d(cin, hidden, 1, bias=False),
                expand_bn=nn.BatchNorm2d(hidden),
                expand_act=nn.ReLU6(),
                depthwise=nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                depthwise_bn=nn.BatchNorm2d(hidden),
                depthwise_act=nn.ReLU6(),
                project=nn.Conv2d(hidden, cout, 1, bias=False),
                project_bn=nn.BatchNorm2d(cout),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


class MobileNetV2Digits(nn.Module):
    """MobileNetV2's layout, narrowed for 32x32 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6()
        )
        self.blocks = nn.Sequential(
            InvertedResidual(16, 16, 1),
            InvertedResidual(16, 24, 2),
            InvertedResidual(24, 24, 1),
            InvertedResidual(24, 32, 2),
            InvertedResidual(32, 32, 1),
        )
        self.head = nn.Sequential(nn.Conv2d(32, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class ResNetDigits(nn.Module):
    """A ResNet-style CNN for 8x8 digits: stem, three BasicBlocks, average pool, fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        self.layer1 = BasicBlock(16, 16, 1)
        self.layer2 = BasicBlock(16, 32, 2)
        self.layer3 = BasicBlock(32, 32, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def train(model: nn.Module, train_x, train_y, seed: int, epochs: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_y), generator=generator)
        for start in range(0, len(order), 64):
            index = order[start : start + 64]
            optimizer.zero_grad()
            CE(model(train_x[index]), train_y[index]).backward()
            optimizer.step()
    return model.eval()


def upscaled(images: torch.Tensor, size: int = 32) -> torch.Tensor:
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


def recovered(fp32: float, ptq: float, better: float) -> float:
    lost = fp32 - ptq
    return (better - ptq) / lost if lost >= NEGLIGIBLE_LOSS_PP else float("nan")


# part 1: CLE + bias correction ------------------------------------------------------------------
CLE_WEIGHT_BITS = (8, 6, 5)  # per-tensor weight widths; activations uint8 per-tensor
CLE_VARIANTS = {
    "ptq": {},
    "ptq+cle": {"equalize": True},
    "ptq+bc": {"bias_correction": True},
    "ptq+cle+bc": {"equalize": True, "bias_correction": True},
    "ptq+cle+abc": {"equalize": True, "bias_correction": "analytic"},
}


def cle_table(
    data, seeds: int, weight_bits: tuple[int, ...] = CLE_WEIGHT_BITS, first_seed: int = 0
) -> pd.DataFrame:
    """One row per per-tensor weight width: the variants' accuracy (mean over seeds), the PTQ
    loss, the share CLE + BC recover (of the mean and seed by seed), the output SQNR."""
    train_x, test_x = upscaled(data.train_x), upscaled(data.test_x)
    calib = [train_x[i * 64 : (i + 1) * 64] for i in range(8)]
    runs = {bits: {name: [] for name in ["fp32", *CLE_VARIANTS]} for bits in weight_bits}
    sqnr = {bits: {name: [] for name in CLE_VARIANTS} for bits in weight_bits}
    for seed in range(first_seed, first_seed + seeds):
        torch.manual_seed(seed)
        model = train(MobileNetV2Digits(), train_x, data.train_y, seed, epochs=8)
        fp32 = accuracy(model, test_x, data.test_y)
        for bits in weight_bits:
            runs[bits]["fp32"].append(fp32)
            for name, options in CLE_VARIANTS.items():
                config = wb.QuantConfig(
                    weight=wb.Scheme(bits, True, False),
                    activation=wb.Scheme(8, False, False),
                    **options,
                )
                result = wb.ptq(model, calib, config=config, progress=False)
                runs[bits][name].append(accuracy(result.model, test_x, data.test_y))
                sqnr[bits][name].append(result.report.summary["model_output_sqnr_db"])
            print(
                f"  MobileNetV2-style seed {seed}, {bits}-bit per-tensor weights: "
                + ", ".join(f"{k} {v[-1]:.2f}" for k, v in runs[bits].items())
                + " | output SQNR dB: "
                + ", ".join(f"{k} {v[-1]:.1f}" for k, v in sqnr[bits].items()),
                flush=True,
            )
    rows = []
    for bits in weight_bits:
        mean = {name: statistics.mean(values) for name, values in runs[bits].items()}
        row = {"model": "MobileNetV2-style, 32x32", "weights": f"int{bits} per-tensor"}
        row |= {f"{name}_%": value for name, value in mean.items()}
        row["ptq_loss_pp"] = mean["fp32"] - mean["ptq"]
        row["cle+bc_recovered"] = recovered(mean["fp32"], mean["ptq"], mean["ptq+cle+bc"])
        row["cle+abc_recovered"] = recovered(mean["fp32"], mean["ptq"], mean["ptq+cle+abc"])
        per_seed = [
            recovered(fp32, ptq, better)
            for fp32, ptq, better in zip(
                runs[bits]["fp32"], runs[bits]["ptq"], runs[bits]["ptq+cle+bc"], strict=True
            )
        ]
        row["seeds_cle+bc_recover_half"] = (
            f"{sum(share >= 0.5 for share in per_seed)} of "
            f"{sum(share == share for share in per_seed)}"
        )
        row |= {f"{name}_sqnr_db": statistics.mean(v) for name, v in sqnr[bits].items()}
        rows.append(row)
    return pd.DataFrame(rows)


# part 2: AdaRound against QAT -------------------------------------------------------------------
def qat_epochs(model, data, config, epochs: int) -> tuple[list[float], list[float]]:
    """Accuracy after each QAT epoch and the training seconds of each (calibration excluded)."""
    calib = data.calib_batches()
    _, prepared, plans = prepare_model(model, calib[0], config)
    finish_calibration(prepared, plans, calibrate(prepared, calib, progress=False))
    enable_qat(prepared, False)
    optimizer = build_optimizer(None, prepared, QAT_LR)
    batches = list(data.train_loader())
    accuracies, seconds = [], []
    for _ in range(epochs):
        prepared.train()
        start = time.perf_counter()
        train_qat(
            prepared, lambda: iter(batches), CE, optimizer, 1, torch.device("cpu"), progress=False
        )
        seconds.append(time.perf_counter() - start)
        prepared.eval()
        accuracies.append(accuracy(prepared, data.test_x, data.test_y))
    return accuracies, seconds


def adaround_table(data, seeds: int, iterations: int) -> pd.DataFrame:
    cases = [
        (
            "4-channel digits CNN",
            "w3a3",
            lambda: DigitsCNN(4),
            wb.QuantConfig(
                weight=wb.Scheme(3, True, True, 0), activation=wb.Scheme(3, False, False)
            ),
        ),
        (
            "ResNet-style digits CNN",
            "W4A8",
            ResNetDigits,
            wb.QuantConfig(
                weight=wb.Scheme(4, True, True, 0), activation=wb.Scheme(8, False, False)
            ),
        ),
    ]
    rows = []
    for name, label, build, config in cases:
        runs: dict[str, list[float]] = {}
        for seed in range(seeds):
            torch.manual_seed(seed)
            model = train(build(), data.train_x, data.train_y, seed, epochs=10)
            values = {"fp32": accuracy(model, data.test_x, data.test_y)}
            start = time.perf_counter()
            plain = wb.ptq(model, data.calib_batches(), config=config, progress=False)
            values["ptq_s"] = time.perf_counter() - start
            values["ptq"] = accuracy(plain.model, data.test_x, data.test_y)
            adaround_config = wb.QuantConfig(
                weight=config.weight,
                activation=config.activation,
                weight_method="adaround",
                adaround_iterations=iterations,
            )
            start = time.perf_counter()
            learned = wb.ptq(model, data.calib_batches(), config=adaround_config, progress=False)
            values["adaround_s"] = time.perf_counter() - start
            values["adaround"] = accuracy(learned.model, data.test_x, data.test_y)
            # bias correction on top of the learned rounding (the same model, not a second run)
            both = copy.deepcopy(learned.model)
            correct_biases(learned.fp32_model, both, data.calib_batches())
            values["adaround+bc"] = accuracy(both, data.test_x, data.test_y)
            qat_acc, qat_s = qat_epochs(model, data, config, QAT_EPOCHS)
            values["qat_epoch_s"] = statistics.mean(qat_s)
            for epoch, value in enumerate(qat_acc, 1):
                values[f"qat_ep{epoch}"] = value
            reached = next((i for i, a in enumerate(qat_acc) if a >= values["adaround"]), None)
            values["qat_s_to_adaround"] = (
                float("nan") if reached is None else sum(qat_s[: reached + 1])
            )
            for key, value in values.items():
                runs.setdefault(key, []).append(value)
            print(
                f"  {name} seed {seed}: " + ", ".join(f"{k} {v:.2f}" for k, v in values.items()),
                flush=True,
            )
        mean = {
            key: statistics.fmean(v) if all(x == x for x in v) else float("nan")
            for key, v in runs.items()
        }
        row = {
            "model": name,
            "config": label,
            "fp32_%": mean["fp32"],
            "ptq_%": mean["ptq"],
            "adaround_%": mean["adaround"],
            "adaround+bc_%": mean["adaround+bc"],
        }
        row["ptq_loss_pp"] = mean["fp32"] - mean["ptq"]
        row["adaround_recovered"] = recovered(mean["fp32"], mean["ptq"], mean["adaround"])
        row |= {f"qat_ep{e}_%": mean[f"qat_ep{e}"] for e in range(1, QAT_EPOCHS + 1)}
        row["ptq_s"] = mean["ptq_s"]
        row["adaround_s"] = mean["adaround_s"]
        row["qat_epoch_s"] = mean["qat_epoch_s"]
        row["qat_s_to_adaround_acc"] = mean["qat_s_to_adaround"]
        rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="FP32 models trained per case")
    parser.add_argument("--adaround-iterations", type=int, default=1000)
    parser.add_argument("--first-seed", type=int, default=0, help="of the CLE + BC part")
    parser.add_argument("--skip-cle", action="store_true")
    parser.add_argument(
        "--weight-bits",
        type=int,
        nargs="+",
        default=list(CLE_WEIGHT_BITS),
        help="per-tensor weight widths of the CLE + BC part",
    )
    parser.add_argument("--skip-adaround", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{machine_line()}; 1 thread, torch {torch.__version__}, {args.seeds} seeds")
    data = load_digits_data()
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        if not args.skip_cle:
            table = cle_table(data, args.seeds, tuple(args.weight_bits), args.first_seed)
            print(
                "\nCLE and bias correction (BC empirical, ABC analytic), test accuracy %, mean "
                "over seeds; recovered = (refined - PTQ) / (FP32 - PTQ), n/a where PTQ loses "
                f"under {NEGLIGIBLE_LOSS_PP} points; seeds_cle+bc_recover_half counts the "
                "seeds where PTQ lost points:"
            )
            print(table.to_string(index=False, float_format="{:.2f}".format, na_rep="n/a"))
        if not args.skip_adaround:
            table = adaround_table(data, args.seeds, args.adaround_iterations)
            print(
                f"\nAdaRound ({args.adaround_iterations} iterations per layer) against PTQ and QAT "
                f"({QAT_EPOCHS} epochs, lr {QAT_LR:g}); times in seconds:"
            )
            print(table.to_string(index=False, float_format="{:.2f}".format, na_rep="n/a"))


if __name__ == "__main__":
    main()
