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
from dataclasses import MISSING, dataclass, fields, replace
from typing import Any

from workbench.core.observers import OBSERVER_NAMES
from workbench.core.scheme import MAX_BITS, MIN_BITS
from workbench.engine.config import PRESETS, WEIGHT_METHODS, QuantConfig
from workbench.engine.qat_options import TrainingOptions

DEFAULT_PRESET = "int8"
METHODS = ("ptq", "qat")

# where an option's value goes
RUN = "run"  # the front end itself (names of notebook variables, output, export, ...)
SEARCH = "search"  # the workflow call: num_batches, max_drop, keep_most_sensitive
SCHEME = "scheme"  # a field of the preset's weight Scheme
CONFIG = "config"  # a QuantConfig field of the same name
TRAINING = "training"  # a TrainingOptions field of the same name (wb.qat's keyword)

# the %quantize help's groups, in order
GROUPS = {
    "run": "what to run",
    "scheme": "scheme (on top of the preset)",
    "refine": "better PTQ without training",
    "lm": "language models",
    "qat": "quantization-aware training (--method qat)",
    "out": "export and benchmark",
}

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


@dataclass(frozen=True)
class Flag:
    """A ``%quantize`` flag that stores a constant (``--per-tensor`` stores False)."""

    text: str
    value: Any
    help: str


@dataclass(frozen=True)
class Control:
    """How the panel shows an option: an ipywidgets control, its row, when it is enabled.

    ``widget``: toggle, dropdown, int, float or checkbox. ``labels``: (label, value) pairs of
    a toggle or dropdown (default: the option's choices). ``value``: the first value (None:
    the engine's default). ``method``: the method it belongs to in the panel (disabled under
    the other one). ``off``: what the config takes while the control is disabled (None: the
    control's value).
    """

    widget: str
    place: tuple[int, int]  # (row, column) in the panel
    label: str = ""
    labels: tuple[tuple[str, Any], ...] = ()
    value: Any = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    method: str | None = None
    off: Any = None


@dataclass(frozen=True)
class Option:
    """One option of ``%quantize``, of a ``%%quantize`` recipe and (with ``control``) of the
    panel.

    ``kind``: name (a notebook variable), text, int, float, bool, choice, alpha (a number in
    [0, 1] or ``auto``), patterns (layer names / globs) or pairs (PATTERN=PRESET).
    ``low`` / ``high`` bound a number (inclusive), ``above`` from below (exclusive).
    ``const``: the value of a choice given without one (``--bias-correction``).
    ``method``: the method it applies to on the line (None: both); ``misuse`` says why it does
    not apply to the other one. ``requires``: (option, value) it needs, and ``reason``.
    The panel shows the options with a ``control`` and those marked ``in_panel``.
    """

    name: str
    kind: str
    help: str
    group: str
    target: str = RUN
    metavar: str | None = None
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    above: float | None = None
    const: Any = None
    flags: tuple[Flag, ...] = ()
    short: str | None = None
    default: Any = None
    method: str | None = None
    misuse: str = ""
    requires: tuple[str, Any] | None = None
    reason: str = ""
    control: Control | None = None
    in_panel: bool = False  # shown by the panel without a Control of this table

    @property
    def flag(self) -> str:
        """The ``%quantize`` spelling: ``--num-batches`` for ``num_batches``."""
        return "--" + self.name.replace("_", "-")


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
    Option(
        "force",
        "bool",
        "",
        "run",
        flags=(Flag("--force", True, "let -o replace a variable that is not an earlier result"),),
        default=False,
    ),
    Option(
        "panel",
        "bool",
        "",
        "run",
        flags=(Flag("--panel", True, "open the panel with these settings"),),
        default=False,
    ),
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
        default=(),
        in_panel=True,
    ),
    Option(
        "override",
        "pairs",
        "layers (names or glob patterns) at a preset's weight and activation schemes, e.g. "
        "fc2=int8 (the quantizers around them follow)",
        "scheme",
        metavar="PATTERN=PRESET",
        default=(),
        in_panel=True,
    ),
    Option(
        "equalize",
        "bool",
        "",
        "refine",
        target=CONFIG,
        flags=(
            Flag(
                "--equalize",
                True,
                "cross-layer equalization (with high-bias absorption) before calibration",
            ),
        ),
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
        "",
        "refine",
        target=CONFIG,
        flags=(
            Flag(
                "--gptq-act-order",
                True,
                "with --weight-method gptq: quantize the input columns in order of decreasing "
                "Hessian diagonal",
            ),
        ),
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
    Option(
        "bench",
        "bool",
        "",
        "out",
        flags=(Flag("--bench", True, "benchmark FP32 against INT8 on ONNX Runtime CPU"),),
        default=False,
    ),
)

BY_NAME: dict[str, Option] = {option.name: option for option in OPTIONS}
CONTROLLED: tuple[Option, ...] = tuple(o for o in OPTIONS if o.control is not None)
PANEL_OPTIONS: tuple[Option, ...] = tuple(o for o in OPTIONS if o.control or o.in_panel)


def engine_default(option: Option, preset: str = DEFAULT_PRESET) -> Any:
    """The value the engine takes when the option is not given: the preset's weight scheme
    field, the QuantConfig field's or the TrainingOptions field's default."""
    if option.target == SCHEME:
        return getattr(PRESETS[preset].weight, option.name)
    owner = {CONFIG: QuantConfig, TRAINING: TrainingOptions}.get(option.target)
    if owner is None:
        return option.default
    field = next(f for f in fields(owner) if f.name == option.name)
    return field.default if field.default is not MISSING else field.default_factory()


def values_for(target: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The given (not None) ``values`` of the options that go to ``target``."""
    return {
        name: value
        for name, value in values.items()
        if name in BY_NAME and BY_NAME[name].target == target and value is not None
    }


def build_config(
    preset: str = DEFAULT_PRESET,
    values: Mapping[str, Any] | None = None,
    override: Mapping[str, str] | None = None,
) -> QuantConfig:
    """The preset's QuantConfig with the options in ``values`` that are not None: the scheme
    options change its weight scheme, the others replace QuantConfig fields. ``override``
    maps layer patterns to preset names: those layers take the preset's weight and
    activation schemes (``QuantConfig.overrides``).

    Activations keep the preset's scheme (uint8 asymmetric per-tensor for ``int8``, as ONNX
    Runtime runs fastest on x86; FP32 for ``int8-weight-only``).
    """
    values = values or {}
    base = QuantConfig.preset(preset)
    changes: dict[str, Any] = values_for(CONFIG, values)
    changes["weight"] = replace(base.weight, **values_for(SCHEME, values))
    if "exclude" in changes:
        changes["exclude"] = tuple(changes["exclude"])
    if override:
        changes["overrides"] = {
            pattern: {"weight": PRESETS[name].weight, "activation": PRESETS[name].activation}
            for pattern, name in override.items()
        }
    return replace(base, **changes)
