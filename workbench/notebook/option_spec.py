"""How a notebook option is declared (:class:`Option`, with its ``%quantize`` flags and its
panel :class:`Control`) and where its value goes; the table itself is ``options.py``."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any

from workbench.engine.config import PRESETS, QuantConfig
from workbench.engine.training.options import TrainingOptions

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
    ``flags``: flags that store a constant; a bool option without them is its ``flag``,
    storing True.
    ``method``: the method it applies to on the line (None: both); ``misuse`` says why it does
    not apply to the other one. ``requires``: (option, value) it needs, and ``reason``.
    The panel shows the options with a ``control`` and those marked ``in_panel``.
    """

    name: str
    kind: str
    help: str
    group: str
    target: str = RUN
    field: str | None = None  # the target's field, when not ``name``
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

    def __post_init__(self) -> None:
        if self.default is None and self.kind in ("patterns", "pairs"):
            object.__setattr__(self, "default", ())  # none given: no layer named
        elif self.default is None and self.kind == "bool" and self.target in (RUN, SEARCH):
            object.__setattr__(self, "default", False)  # a front-end switch: off

    @property
    def flag(self) -> str:
        """The ``%quantize`` spelling: ``--num-batches`` for ``num_batches``."""
        return "--" + self.name.replace("_", "-")


def engine_default(option: Option, preset: str = "int8") -> Any:
    """The value the engine takes when the option is not given: the preset's weight scheme
    field, the QuantConfig field's or the TrainingOptions field's default."""
    if option.target == SCHEME:
        return getattr(PRESETS[preset].weight, option.name)
    owner = {CONFIG: QuantConfig, TRAINING: TrainingOptions}.get(option.target)
    if owner is None:
        return option.default
    field = next(f for f in fields(owner) if f.name == option.name)
    return field.default if field.default is not MISSING else field.default_factory()
