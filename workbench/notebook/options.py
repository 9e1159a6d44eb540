"""The options of the notebook front ends, declared once.

Each :class:`Option` says what the option is (kind, choices, bounds, help), where it goes
(``target``: a ``QuantConfig`` field, a change of the preset's weight scheme, a
``TrainingOptions`` field, or the front end's own run options) and how each front end shows
it. From this table come the ``%quantize`` parser (``magic_args.py``), the ``%%quantize``
recipe keys and their checks (``recipe.py``), the panel's scheme controls
(``panel_controls.py``) and the arguments ``actions.quantize`` passes on. Adding an option is
one entry here plus its engine code; the engine checks the values it receives
(``QuantConfig.__post_init__``, ``TrainingOptions``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from workbench.core.observers import OBSERVER_NAMES
from workbench.core.scheme import MAX_BITS, MIN_BITS
from workbench.engine.config import PRESETS, WEIGHT_METHODS
from workbench.notebook.option_spec import (
    CONFIG,
    SCHEME,
    SEARCH,
    TRAINING,
    Control,
    Flag,
    Option,
)

DEFAULT_PRESET = "int8"
METHODS = ("ptq", "qat")

# the end of %quantize's help: each option in use
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
  %quantize lm --calib calib_batches --preset int4-weight-g32 --genai-bench tokenizer
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


REFINES_PTQ = "refine PTQ; QAT trains the weights (drop them, or drop --method qat)"

OPTIONS: tuple[Option, ...] = (
    Option("model", "name", "the nn.Module to quantize", "run", metavar="MODEL"),
    Option(
        "calib",
        "name",
        "calibration data (PTQ): DataLoader, batches, tensor",
        "run",
        metavar="DATA",
    ),
    Option(
        "report_data",
        "name",
        "held-out batches the report's per-layer errors are measured on (default: the "
        "calibration batches)",
        "run",
        metavar="DATA",
    ),
    Option(
        "method",
        "choice",
        "ptq (default) or qat",
        "run",
        choices=METHODS,
        default="ptq",
        control=Control(
            "toggle", (0, 0), "method", labels=(("PTQ", "ptq"), ("QAT", "qat")), value="ptq"
        ),
    ),
    Option("eval", "name", "eval_fn(model) -> float, e.g. accuracy", "run", metavar="FN"),
    Option(
        "num_batches",
        "int",
        "use at most N calibration batches",
        "run",
        target=SEARCH,
        metavar="N",
        low=1,
        method="ptq",
        misuse="applies to PTQ; QAT calibrates on --calib (default: the first 8 --train batches)",
        control=Control("int", (4, 0), "calibration batches", low=1, high=1_000_000, method="ptq"),
    ),
    Option(
        "max_drop",
        "float",
        "with --eval: keep the fewest most sensitive layers in higher precision (FP32, or "
        "8-bit below 8 bits) so that PTQ drops the metric by at most X; with --method qat, "
        "then train with those precisions",
        "run",
        target=SEARCH,
        metavar="X",
        low=0,
        in_panel=True,
    ),
    Option(
        "auto",
        "bool",
        "with --eval: search presets, observers, methods and per-layer precision for the "
        "fastest exported model within --max-drop (default 0.01) of FP32 (wb.autotune)",
        "run",
        target=SEARCH,
        method="ptq",
        misuse="searches PTQ runs; drop --method qat",
    ),
    Option(
        "keep_most_sensitive",
        "int",
        "keep the N most sensitive layers FP32 (with --max-drop, the rest searched); with "
        "--method qat, then train",
        "run",
        target=SEARCH,
        metavar="N",
        low=1,
        in_panel=True,
    ),
    Option(
        "output",
        "name",
        "also store the result as NAME (a new name, or one holding an earlier result)",
        "run",
        metavar="NAME",
        short="-o",
    ),
    Option("force", "bool", "let -o replace a variable that is not an earlier result", "run"),
    Option("panel", "bool", "open the panel with these settings", "run"),
    Option(
        "preset",
        "choice",
        "named preset (default int8)",
        "scheme",
        choices=tuple(PRESETS),
        default=DEFAULT_PRESET,
        control=Control("dropdown", (0, 1), "preset", value=DEFAULT_PRESET),
    ),
    Option(
        "bits",
        "int",
        "weight bits, 2..8",
        "scheme",
        target=SCHEME,
        metavar="N",
        low=MIN_BITS,
        high=MAX_BITS,
        control=Control("int", (1, 0), "weight bits", low=MIN_BITS, high=MAX_BITS),
    ),
    Option(
        "per_channel",
        "bool",
        "",
        "scheme",
        target=SCHEME,
        flags=(
            Flag("--per-channel", True, "one weight scale per output channel"),
            Flag("--per-tensor", False, "one weight scale per tensor"),
        ),
        control=Control("toggle", (1, 2), labels=(("per-channel", True), ("per-tensor", False))),
    ),
    Option(
        "symmetric",
        "bool",
        "",
        "scheme",
        target=SCHEME,
        flags=(
            Flag("--symmetric", True, "signed weights, zero point 0"),
            Flag("--asymmetric", False, "unsigned weights with a fitted zero point"),
        ),
        control=Control("toggle", (1, 1), labels=(("symmetric", True), ("asymmetric", False))),
    ),
    Option(
        "observer",
        "choice",
        "activation range observer",
        "scheme",
        target=CONFIG,
        choices=tuple(OBSERVER_NAMES),
        control=Control("dropdown", (0, 2), "observer"),
    ),
    Option(
        "exclude",
        "patterns",
        "layer names or glob patterns kept FP32",
        "scheme",
        target=CONFIG,
        metavar="PATTERN",
        in_panel=True,
    ),
    Option(
        "override",
        "pairs",
        "layers (names or glob patterns) at a preset's weight and activation schemes, e.g. "
        "fc2=int8 (the quantizers around them follow)",
        "scheme",
        target=CONFIG,
        field="overrides",
        metavar="PATTERN=PRESET",
        in_panel=True,
    ),
    Option(
        "equalize",
        "bool",
        "cross-layer equalization (with high-bias absorption) before calibration",
        "refine",
        target=CONFIG,
        control=Control("checkbox", (2, 0), "cross-layer equalization (PTQ)", method="ptq"),
    ),
    Option(
        "smoothquant",
        "alpha",
        "SmoothQuant before calibration: alpha in [0, 1] (e.g. 0.5) or auto (per layer from "
        "the calibration data); moves activation outliers into the weights",
        "refine",
        target=CONFIG,
        metavar="ALPHA",
        low=0.0,
        high=1.0,
        control=Control(
            "dropdown",
            (3, 1),
            "SmoothQuant",
            labels=(("off", None), ("alpha 0.5", 0.5), ("alpha auto", "auto")),
        ),
    ),
    Option(
        "bias_correction",
        "choice",
        "remove each layer's expected output error from its bias: empirical (the default: "
        "measured on the calibration data) or analytic (from the folded BatchNorms' "
        "statistics, no data)",
        "refine",
        target=CONFIG,
        metavar="METHOD",
        choices=("empirical", "analytic"),
        const=True,
        method="ptq",
        misuse=REFINES_PTQ,
        control=Control(
            "dropdown",
            (2, 1),
            "bias correction",
            labels=(("off", False), ("empirical", True), ("analytic", "analytic")),
            method="ptq",
            off=False,
        ),
    ),
    Option(
        "weight_method",
        "choice",
        "weight rounding: nearest (default), adaround (learned per layer) or gptq "
        "(second-order error feedback per layer)",
        "refine",
        target=CONFIG,
        choices=WEIGHT_METHODS,
        method="ptq",
        misuse=REFINES_PTQ,
        control=Control("dropdown", (2, 2), "weight rounding", method="ptq", off="nearest"),
    ),
    Option(
        "gptq_act_order",
        "bool",
        "with --weight-method gptq: quantize the input columns in order of decreasing "
        "Hessian diagonal",
        "refine",
        target=CONFIG,
        method="ptq",
        misuse=REFINES_PTQ,
        requires=("weight_method", "gptq"),
        reason="orders GPTQ's columns",
        control=Control("checkbox", (3, 0), "GPTQ act-order", method="ptq", off=False),
    ),
    Option(
        "adaround_iterations",
        "int",
        "optimisation steps per layer for --weight-method adaround (default 1000)",
        "refine",
        target=CONFIG,
        metavar="N",
        low=1,
    ),
    Option(
        "quantize_lm_head",
        "bool",
        "",
        "lm",
        target=CONFIG,
        flags=(
            Flag(
                "--no-quantize-lm-head",
                False,
                "keep the LM head (model.get_output_embeddings()) FP32",
            ),
        ),
        control=Control("checkbox", (3, 2), "quantize LM head"),
    ),
    Option(
        "train",
        "name",
        "training data: DataLoader of (x, y)",
        "qat",
        metavar="DATA",
        method="qat",
    ),
    Option(
        "loss", "name", "loss_fn(output, target) -> loss tensor", "qat", metavar="FN", method="qat"
    ),
    Option(
        "epochs",
        "int",
        "training epochs",
        "qat",
        target=TRAINING,
        metavar="N",
        low=1,
        method="qat",
        control=Control("int", (4, 1), "QAT epochs", low=1, high=10_000, method="qat"),
    ),
    Option(
        "lr",
        "float",
        "learning rate",
        "qat",
        target=TRAINING,
        metavar="X",
        above=0,
        method="qat",
        control=Control("float", (4, 2), "QAT lr", low=1e-9, high=10.0, step=1e-5, method="qat"),
    ),
    Option("export", "text", "write an INT8 QDQ ONNX model to PATH", "out", metavar="PATH"),
    Option(
        "example",
        "name",
        "example input for export (default: first batch)",
        "out",
        metavar="INPUT",
    ),
    Option("bench", "bool", "benchmark FP32 against INT8 on ONNX Runtime CPU", "out"),
    Option(
        "genai_bench",
        "name",
        "decoder LMs (LLaMA, Mistral, Qwen2; 4-bit block-wise weights): build ONNX Runtime "
        "GenAI folders with this tokenizer (ours, and onnxruntime-genai's FP32 and RTN int4 "
        "builds of the FP32 weights) and time prefill and decode tokens/s on the calibration "
        "batches' first tokens",
        "out",
        metavar="TOKENIZER",
    ),
)

BY_NAME: dict[str, Option] = {option.name: option for option in OPTIONS}
CONTROLLED: tuple[Option, ...] = tuple(o for o in OPTIONS if o.control is not None)
PANEL_OPTIONS: tuple[Option, ...] = tuple(o for o in OPTIONS if o.control or o.in_panel)


def values_for(target: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The given (not None) ``values`` of the options that go to ``target``."""
    return {
        name: value
        for name, value in values.items()
        if name in BY_NAME and BY_NAME[name].target == target and value is not None
    }
