"""The ``%quantize`` option parser and its help text.

The options are also the keys of a ``%%quantize`` YAML recipe (``--num-batches`` is
``num_batches``), so both are parsed into the same dict of option -> value.
"""

from __future__ import annotations

import argparse
import shlex
from typing import Any

from IPython.core.error import UsageError

from workbench.core.observers import OBSERVER_NAMES
from workbench.engine.config import PRESETS, WEIGHT_METHODS

METHODS = ("ptq", "qat")
BIAS_CORRECTION_METHODS = ("empirical", "analytic")

DESCRIPTION = """\
Quantize the nn.Module called MODEL in this notebook with post-training quantization (PTQ,
the default) or quantization-aware training (QAT), and return the QuantResult; it displays as
the per-layer report. MODEL, DATA, FN and INPUT are names of notebook variables (dotted
attributes such as data.calib work too). The scheme options change the preset's weight scheme;
activations follow the preset (uint8 asymmetric per-tensor for int8, FP32 for
int8-weight-only)."""

EXAMPLES = """\
examples:
  %quantize model --calib calib_loader
  %quantize model --calib calib_loader --eval accuracy -o res
  %quantize model --calib calib_loader --eval accuracy --bits 4 --max-drop 0.5
  %quantize model --calib calib_loader --preset int8-per-tensor --observer percentile
  %quantize model --calib calib_loader --bits 4 --asymmetric --exclude fc2 "encoder.*.dense"
  %quantize model --calib calib_loader --preset w4a4 --override fc2=int8 "stem.*=int8"
  %quantize model --method qat --train train_loader --loss loss_fn --epochs 2 --lr 1e-4
  %quantize model --method qat --train train --loss loss_fn --eval accuracy --bits 4 --max-drop 0.5
  %quantize model --calib calib_loader --keep-most-sensitive 2 --report-data test_loader
  %quantize model --calib calib_loader --export model_int8.onnx --example x --bench
  %quantize model --calib calib_loader --equalize --bias-correction --weight-method adaround
  %quantize model --calib calib --bias-correction analytic --weight-method gptq --gptq-act-order
  %quantize lm --calib calib_batches --weight-method gptq --no-quantize-lm-head
  %quantize model --calib calib_loader --panel

  %%quantize model
  # a YAML recipe: the same keys as the options, kept in the notebook and re-run
  calib: calib_loader
  preset: int8
  observer: entropy
  exclude: [fc2]
  override: {head: int8}
  eval: accuracy
  output: res
"""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes become one-line UsageErrors instead of SystemExit."""

    def error(self, message: str):
        raise UsageError(f"%quantize: {message} (see %quantize? for the options)")

    def exit(self, status: int = 0, message: str | None = None):
        raise UsageError(f"%quantize: {(message or 'invalid options').strip()}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _smoothquant_alpha(text: str) -> float | str:
    if text == "auto":
        return text
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be an alpha in [0, 1] or auto, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


_positive_int.__name__ = "positive int"
_positive_float.__name__ = "positive number"
_non_negative_float.__name__ = "number >= 0"


def build_parser() -> argparse.ArgumentParser:
    """The ``%quantize`` parser. Every default is None so that given options can be told apart
    from defaults (a ``%%quantize`` line and its recipe must not both set one key)."""
    parser = _Parser(
        prog="%quantize",
        usage="%%quantize MODEL [--calib DATA] [--method ptq|qat] [options]\n"
        "       %%%%quantize MODEL [options]   (cell body: a YAML recipe with the same keys)",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        add_help=False,
        allow_abbrev=False,
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, width=100),
    )
    parser.add_argument("model", nargs="?", metavar="MODEL", help="the nn.Module to quantize")
    what = parser.add_argument_group("what to run")
    what.add_argument(
        "--calib", metavar="DATA", help="calibration data (PTQ): DataLoader, batches, tensor"
    )
    what.add_argument(
        "--report-data",
        metavar="DATA",
        help="held-out batches the report's per-layer errors are measured on (default: the "
        "calibration batches)",
    )
    what.add_argument("--method", choices=METHODS, help="ptq (default) or qat")
    what.add_argument("--eval", metavar="FN", help="eval_fn(model) -> float, e.g. accuracy")
    what.add_argument(
        "--num-batches", type=_positive_int, metavar="N", help="use at most N calibration batches"
    )
    what.add_argument(
        "--max-drop",
        type=_non_negative_float,
        metavar="X",
        help="with --eval: keep the fewest most sensitive layers in higher precision "
        "(FP32, or 8-bit below 8 bits) so that PTQ drops the metric by at most X; with "
        "--method qat, then train with those precisions",
    )
    what.add_argument(
        "--keep-most-sensitive",
        type=_positive_int,
        metavar="N",
        help="keep the N most sensitive layers FP32 (with --max-drop, the rest searched); "
        "with --method qat, then train",
    )
    what.add_argument(
        "-o",
        "--output",
        metavar="NAME",
        help="also store the result as NAME (a new name, or one holding an earlier result)",
    )
    what.add_argument(
        "--force",
        action="store_const",
        const=True,
        help="let -o replace a variable that is not an earlier result",
    )
    what.add_argument(
        "--panel", action="store_const", const=True, help="open the panel with these settings"
    )
    scheme = parser.add_argument_group("scheme (on top of the preset)")
    scheme.add_argument("--preset", choices=list(PRESETS), help="named preset (default int8)")
    scheme.add_argument("--bits", type=int, metavar="N", help="weight bits, 2..8")
    granularity = scheme.add_mutually_exclusive_group()
    granularity.add_argument(
        "--per-channel",
        dest="per_channel",
        action="store_const",
        const=True,
        help="one weight scale per output channel",
    )
    granularity.add_argument(
        "--per-tensor",
        dest="per_channel",
        action="store_const",
        const=False,
        help="one weight scale per tensor",
    )
    symmetry = scheme.add_mutually_exclusive_group()
    symmetry.add_argument(
        "--symmetric",
        dest="symmetric",
        action="store_const",
        const=True,
        help="signed weights, zero point 0",
    )
    symmetry.add_argument(
        "--asymmetric",
        dest="symmetric",
        action="store_const",
        const=False,
        help="unsigned weights with a fitted zero point",
    )
    scheme.add_argument("--observer", choices=OBSERVER_NAMES, help="activation range observer")
    scheme.add_argument(
        "--exclude",
        nargs="+",
        action="extend",
        metavar="PATTERN",
        help="layer names or glob patterns kept FP32",
    )
    scheme.add_argument(
        "--override",
        nargs="+",
        action="extend",
        metavar="PATTERN=PRESET",
        help="layers (names or glob patterns) at a preset's weight and activation schemes, "
        "e.g. fc2=int8 (the quantizers around them follow)",
    )
    refine = parser.add_argument_group("better PTQ without training")
    refine.add_argument(
        "--equalize",
        action="store_const",
        const=True,
        help="cross-layer equalization (with high-bias absorption) before calibration",
    )
    refine.add_argument(
        "--smoothquant",
        type=_smoothquant_alpha,
        metavar="ALPHA",
        help="SmoothQuant before calibration: alpha in [0, 1] (e.g. 0.5) or auto (per layer "
        "from the calibration data); moves activation outliers into the weights",
    )
    refine.add_argument(
        "--bias-correction",
        nargs="?",
        const=True,
        choices=BIAS_CORRECTION_METHODS,
        metavar="METHOD",
        help="remove each layer's expected output error from its bias: empirical (the "
        "default: measured on the calibration data) or analytic (from the folded BatchNorms' "
        "statistics, no data)",
    )
    refine.add_argument(
        "--weight-method",
        choices=WEIGHT_METHODS,
        help="weight rounding: nearest (default), adaround (learned per layer) or gptq "
        "(second-order error feedback per layer)",
    )
    refine.add_argument(
        "--gptq-act-order",
        action="store_const",
        const=True,
        help="with --weight-method gptq: quantize the input columns in order of decreasing "
        "Hessian diagonal",
    )
    refine.add_argument(
        "--adaround-iterations",
        type=_positive_int,
        metavar="N",
        help="optimisation steps per layer for --weight-method adaround (default 1000)",
    )
    scheme_lm = parser.add_argument_group("language models")
    scheme_lm.add_argument(
        "--no-quantize-lm-head",
        dest="quantize_lm_head",
        action="store_const",
        const=False,
        help="keep the LM head (model.get_output_embeddings()) FP32",
    )
    qat = parser.add_argument_group("quantization-aware training (--method qat)")
    qat.add_argument("--train", metavar="DATA", help="training data: DataLoader of (x, y)")
    qat.add_argument("--loss", metavar="FN", help="loss_fn(output, target) -> loss tensor")
    qat.add_argument("--epochs", type=_positive_int, metavar="N", help="training epochs")
    qat.add_argument("--lr", type=_positive_float, metavar="X", help="learning rate")
    out = parser.add_argument_group("export and benchmark")
    out.add_argument("--export", metavar="PATH", help="write an INT8 QDQ ONNX model to PATH")
    out.add_argument(
        "--example", metavar="INPUT", help="example input for export (default: first batch)"
    )
    out.add_argument(
        "--bench",
        action="store_const",
        const=True,
        help="benchmark FP32 against INT8 on ONNX Runtime CPU",
    )
    return parser


PARSER = build_parser()
HELP = PARSER.format_help()
OPTION_KEYS: tuple[str, ...] = tuple(dict.fromkeys(action.dest for action in PARSER._actions))


def parse_line(line: str) -> dict[str, Any]:
    """The options given on a ``%quantize`` line, as ``{key: value}`` (absent ones left out)."""
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"%quantize: cannot split the line ({exc}); check the quotes") from None
    namespace = PARSER.parse_args(words)
    return {key: value for key, value in vars(namespace).items() if value is not None}
