"""The panel's scheme controls: method, preset, bits, symmetric / per-channel, observer,
equalization / bias correction / weight rounding (PTQ), batches, QAT epochs and lr, the layers
kept FP32, each layer's precision (``layer_precision.py``), keep-N-most-sensitive, auto mixed
precision.

A mixin of :class:`~workbench.notebook.panel.WorkbenchPanel`, so that the controls stay the
panel's own attributes (``panel.bits.value = 4``); it turns them into a QuantConfig and
nothing else. The keep-FP32 list comes from the engine's planner (``actions``).
"""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets

from workbench.engine.config import WEIGHT_METHODS
from workbench.notebook import actions
from workbench.notebook.display import status_html
from workbench.notebook.layer_precision import LayerPrecision
from workbench.notebook.recipe import DEFAULT_PRESET, MAX_BITS, MIN_BITS, build_config

RUN_STEPS = 3  # quantize, tables, runs table
DEFAULT_NUM_BATCHES = 32
DEFAULT_EPOCHS, DEFAULT_LR = 1, 1e-4
DEFAULT_MAX_DROP = 0.5


def count_batches(data: Any) -> int:
    """How many batches ``data`` holds when it can say so (a tensor is one batch)."""
    if data is None or isinstance(data, dict) or hasattr(data, "dim"):
        return 1
    try:
        return max(1, len(data))
    except TypeError:
        return DEFAULT_NUM_BATCHES


class PanelControls:
    """The controls part of the panel (needs ``model``, ``calib_data``, ``eval_fn``)."""

    def _build_controls(self) -> None:
        style = {"description_width": "initial"}
        self.method = widgets.ToggleButtons(
            options=[("PTQ", "ptq"), ("QAT", "qat")], value="ptq", description="method"
        )
        self.preset = widgets.Dropdown(
            options=list(actions.PRESET_NAMES), value=DEFAULT_PRESET, description="preset"
        )
        self.observer = widgets.Dropdown(
            options=list(actions.OBSERVERS), value="minmax", description="observer"
        )
        self.bits = widgets.BoundedIntText(
            value=8, min=MIN_BITS, max=MAX_BITS, description="weight bits", style=style
        )
        self.symmetric = widgets.ToggleButtons(
            options=[("symmetric", True), ("asymmetric", False)], value=True
        )
        self.per_channel = widgets.ToggleButtons(
            options=[("per-channel", True), ("per-tensor", False)], value=True
        )
        self.num_batches = widgets.BoundedIntText(
            value=count_batches(self.calib_data),
            min=1,
            max=1_000_000,
            description="calibration batches",
            style=style,
        )
        self.epochs = widgets.BoundedIntText(
            value=DEFAULT_EPOCHS, min=1, max=10_000, description="QAT epochs", style=style
        )
        self.lr = widgets.BoundedFloatText(
            value=DEFAULT_LR, min=1e-9, max=10.0, step=1e-5, description="QAT lr", style=style
        )
        names = actions.quantizable_layers(self.model, actions.preset_config(DEFAULT_PRESET))
        self.keep_fp32 = widgets.SelectMultiple(
            options=names,
            value=(),
            rows=min(8, max(2, len(names))),
            description="keep FP32",
            style=style,
        )
        self.layer_precision = LayerPrecision(names, self.keep_fp32)
        self.keep_most_sensitive = widgets.BoundedIntText(
            value=0,
            min=0,
            max=max(0, len(names) - 1),  # keeping every layer FP32 quantizes nothing
            description="keep the N most sensitive layers FP32",
            style=style,
        )
        self.mixed_precision = widgets.Checkbox(
            value=False,
            description="auto mixed precision",
            disabled=self.eval_fn is None,
            tooltip="needs eval_fn" if self.eval_fn is None else "",
            indent=False,
        )
        self.max_drop = widgets.BoundedFloatText(
            value=DEFAULT_MAX_DROP, min=0.0, max=1e12, step=0.1, description="max drop"
        )
        self.equalize = widgets.Checkbox(
            value=False, description="cross-layer equalization (PTQ)", indent=False
        )
        self.bias_correction = widgets.Dropdown(
            options=[("off", False), ("empirical", True), ("analytic", "analytic")],
            value=False,
            description="bias correction",
            style=style,
        )
        self.gptq_act_order = widgets.Checkbox(
            value=False, description="GPTQ act-order", indent=False, disabled=True
        )
        self.quantize_lm_head = widgets.Checkbox(
            value=True, description="quantize LM head", indent=False
        )
        self.weight_method = widgets.Dropdown(
            options=list(WEIGHT_METHODS),
            value="nearest",
            description="weight rounding",
            style=style,
        )
        self.smoothquant = widgets.Dropdown(
            options=[("off", None), ("alpha 0.5", 0.5), ("alpha auto", "auto")],
            value=None,
            description="SmoothQuant",
            style=style,
        )
        self.run_button = widgets.Button(description="Run", button_style="primary", icon="play")
        self.progress = widgets.IntProgress(value=0, min=0, max=RUN_STEPS, bar_style="info")
        self.progress.layout.display = "none"
        self.status = widgets.HTML(status_html("Choose a scheme and press Run."))
        self.preset.observe(self._on_preset, names="value")
        self.method.observe(self._on_method, names="value")
        self.weight_method.observe(self._on_method, names="value")
        self.mixed_precision.observe(self._on_mixed_precision, names="value")
        self.run_button.on_click(self._on_run)

    def _on_preset(self, _change=None) -> None:
        weight = actions.preset_weight_scheme(self.preset.value)
        self.bits.value = weight.bits
        self.symmetric.value = weight.symmetric
        self.per_channel.value = weight.per_channel

    def _on_method(self, _change=None) -> None:
        qat = self.method.value == "qat"
        self.epochs.disabled = not qat
        self.lr.disabled = not qat
        self.num_batches.disabled = qat  # a PTQ option: QAT calibrates on calib_data whole
        for control in (self.equalize, self.bias_correction, self.weight_method):
            control.disabled = qat
        self.gptq_act_order.disabled = qat or self.weight_method.value != "gptq"

    def _on_mixed_precision(self, _change=None) -> None:
        self.max_drop.disabled = not self.mixed_precision.value

    def set_controls(
        self,
        method: str | None = None,
        preset: str | None = None,
        bits: int | None = None,
        symmetric: bool | None = None,
        per_channel: bool | None = None,
        observer: str | None = None,
        exclude: tuple[str, ...] = (),
        num_batches: int | None = None,
        epochs: int | None = None,
        lr: float | None = None,
        max_drop: float | None = None,
        equalize: bool | None = None,
        bias_correction: bool | None = None,
        weight_method: str | None = None,
        keep_most_sensitive: int | None = None,
        override: tuple[tuple[str, str], ...] = (),
        smoothquant: float | str | None = None,
        gptq_act_order: bool | None = None,
        quantize_lm_head: bool | None = None,
    ) -> None:
        """Set the controls; None leaves one as it is. ``exclude`` patterns select the layers
        they match in the keep-FP32 list; ``override`` (pattern, preset) pairs set the layers
        they match to that preset; ``max_drop`` turns auto mixed precision on."""
        values = {
            self.method: method,
            self.preset: preset,  # before the scheme controls: a preset resets them
            self.bits: bits,
            self.symmetric: symmetric,
            self.per_channel: per_channel,
            self.observer: observer,
            self.num_batches: num_batches,
            self.epochs: epochs,
            self.lr: lr,
            self.equalize: equalize,
            # "empirical" is the dropdown's True (QuantConfig takes either)
            self.bias_correction: True if bias_correction == "empirical" else bias_correction,
            self.weight_method: weight_method,
            self.gptq_act_order: gptq_act_order,
            self.quantize_lm_head: quantize_lm_head,
            self.keep_most_sensitive: keep_most_sensitive,
        }
        for control, value in values.items():
            if value is not None:
                control.value = value
        if smoothquant is not None:
            known = [value for _, value in self.smoothquant.options]
            if smoothquant not in known:
                options = [*self.smoothquant.options, (f"alpha {smoothquant}", smoothquant)]
                self.smoothquant.options = options
            self.smoothquant.value = smoothquant
        if max_drop is not None:
            self.max_drop.value = max_drop
            self.mixed_precision.value = True
        self.layer_precision.set_patterns(override)
        if exclude:  # after the overrides: exclude wins, as in the engine
            self.keep_fp32.value = actions.layers_matching(self.keep_fp32.options, exclude)

    def config(self):
        """The QuantConfig the controls describe."""
        ptq = self.method.value == "ptq"
        return build_config(
            self.preset.value,
            self.bits.value,
            self.symmetric.value,
            self.per_channel.value,
            self.observer.value,
            tuple(self.keep_fp32.value),
            override=self.layer_precision.overrides_in_use(),
            equalize=self.equalize.value,
            smoothquant=self.smoothquant.value,
            # QAT trains weights and biases: the rounding and bias options are PTQ's only
            bias_correction=self.bias_correction.value if ptq else False,
            weight_method=self.weight_method.value if ptq else "nearest",
            gptq_act_order=self.gptq_act_order.value and not self.gptq_act_order.disabled,
            quantize_lm_head=self.quantize_lm_head.value,
        )
