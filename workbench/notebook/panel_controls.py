"""The panel's scheme controls, generated from the option table (``options.py``): method,
preset, weight scheme, activation range, PTQ refinements, batches, training; plus the layers
kept FP32, each layer's precision (``layer_precision.py``), keep-N-most-sensitive and auto
mixed precision.

A mixin of :class:`~workbench.notebook.panel.WorkbenchPanel`, so that the controls stay the
panel's own attributes (``panel.bits.value = 4``, one per option name); it turns them into a
QuantConfig and the run options, and nothing else. The keep-FP32 list comes from the engine's
planner (``actions``).
"""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets

from workbench.notebook import actions
from workbench.notebook.display import status_html
from workbench.notebook.layer_precision import LayerPrecision
from workbench.notebook.option_spec import (
    CONFIG,
    SCHEME,
    SEARCH,
    TRAINING,
    Option,
    engine_default,
)
from workbench.notebook.options import CONTROLLED, DEFAULT_PRESET, PANEL_OPTIONS
from workbench.notebook.recipe import build_config

RUN_STEPS = 3  # quantize, tables, runs table
DEFAULT_NUM_BATCHES = 32
DEFAULT_MAX_DROP = 0.5
_STYLE = {"description_width": "initial"}
_WATCHED = {"method"} | {o.requires[0] for o in CONTROLLED if o.requires}


def count_batches(data: Any) -> int:
    """How many batches ``data`` holds when it can say so (a tensor is one batch)."""
    if data is None or isinstance(data, dict) or hasattr(data, "dim"):
        return 1
    try:
        return max(1, len(data))
    except TypeError:
        return DEFAULT_NUM_BATCHES


def make_control(option: Option, value: Any) -> widgets.Widget:
    """The ipywidgets control of ``option`` as its ``Control`` declares it."""
    c = option.control
    labels = list(c.labels) or list(option.choices)
    if c.widget == "toggle":
        return widgets.ToggleButtons(options=labels, value=value, description=c.label)
    if c.widget == "dropdown":
        return widgets.Dropdown(options=labels, value=value, description=c.label, style=_STYLE)
    if c.widget == "checkbox":
        return widgets.Checkbox(value=value, description=c.label, indent=False)
    kind = widgets.BoundedIntText if c.widget == "int" else widgets.BoundedFloatText
    bounds = {"min": c.low, "max": c.high} | ({"step": c.step} if c.step else {})
    return kind(value=value, description=c.label, style=_STYLE, **bounds)


class PanelControls:
    """The controls part of the panel (needs ``model``, ``calib_data``, ``eval_fn``)."""

    def _build_controls(self) -> None:
        first = {"num_batches": count_batches(self.calib_data)}
        for option in CONTROLLED:
            value = option.control.value
            value = first.get(option.name, engine_default(option) if value is None else value)
            setattr(self, option.name, make_control(option, value))
        names = actions.quantizable_layers(self.model, DEFAULT_PRESET)
        self.keep_fp32 = widgets.SelectMultiple(
            options=names,
            value=(),
            rows=min(8, max(2, len(names))),
            description="keep FP32",
            style=_STYLE,
        )
        self.layer_precision = LayerPrecision(names, self.keep_fp32)
        self.keep_most_sensitive = widgets.BoundedIntText(
            value=0,
            min=0,
            max=max(0, len(names) - 1),  # keeping every layer FP32 quantizes nothing
            description="keep the N most sensitive layers FP32",
            style=_STYLE,
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
        self.run_button = widgets.Button(description="Run", button_style="primary", icon="play")
        self.progress = widgets.IntProgress(value=0, min=0, max=RUN_STEPS, bar_style="info")
        self.progress.layout.display = "none"
        self.status = widgets.HTML(status_html("Choose a scheme and press Run."))
        self.preset.observe(self._on_preset, names="value")
        for name in _WATCHED:
            getattr(self, name).observe(self._on_method, names="value")
        self.mixed_precision.observe(self._on_mixed_precision, names="value")
        self.run_button.on_click(self._on_run)

    def control_rows(self) -> list[widgets.HBox]:
        """The table's controls in the rows and columns their ``Control.place`` gives."""
        rows: dict[int, list[tuple[int, widgets.Widget]]] = {}
        for option in CONTROLLED:
            row, column = option.control.place
            rows.setdefault(row, []).append((column, getattr(self, option.name)))
        return [widgets.HBox([w for _, w in sorted(rows[row])]) for row in sorted(rows)]

    def _on_preset(self, _change=None) -> None:
        for option in CONTROLLED:
            if option.target == SCHEME:
                getattr(self, option.name).value = engine_default(option, self.preset.value)

    def _enabled(self, option: Option) -> bool:
        method = option.control.method
        if method is not None and method != self.method.value:
            return False
        if option.requires is not None:
            other, wanted = option.requires
            return getattr(self, other).value == wanted
        return True

    def _on_method(self, _change=None) -> None:
        for option in CONTROLLED:
            getattr(self, option.name).disabled = not self._enabled(option)

    def _on_mixed_precision(self, _change=None) -> None:
        self.max_drop.disabled = not self.mixed_precision.value

    def set_controls(self, **values: Any) -> None:
        """Set the controls of the options in ``values`` (``options.PANEL_OPTIONS``); None
        leaves one as it is. The patterns of the layers kept FP32 select the layers they
        match in the keep-FP32 list; (pattern, preset) pairs set the layers they match to
        that preset; a max drop turns auto mixed precision on."""
        known = {option.name: option for option in PANEL_OPTIONS}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise TypeError(f"set_controls() got unknown options: {', '.join(unknown)}")
        patterns, pairs = (), ()
        for option in PANEL_OPTIONS:  # the table's order: a preset before the scheme
            name, value = option.name, values.get(option.name)
            if value is None:
                continue
            if option.kind == "patterns":
                patterns = value
            elif option.kind == "pairs":
                pairs = value
            elif option.control is not None:
                self._set_control(option, value)
            else:
                getattr(self, name).value = value
                if name == "max_drop":
                    self.mixed_precision.value = True
        self.layer_precision.set_patterns(pairs)
        if patterns:  # after the layer presets: kept FP32 wins, as in the engine
            self.keep_fp32.value = actions.layers_matching(self.keep_fp32.options, patterns)

    def _set_control(self, option: Option, value: Any) -> None:
        control = getattr(self, option.name)
        if option.const is not None and value == option.choices[0]:
            value = option.const  # the choice a bare flag means is the dropdown's const
        labels = option.control.labels
        if labels and value not in [known for _, known in labels]:
            extra = (f"{option.metavar.lower()} {value}", value)
            control.options = [*control.options, extra]
        control.value = value

    def _control_values(self, targets: tuple[str, ...]) -> dict[str, Any]:
        """The values of the controls whose options go to ``targets``; a disabled control
        gives its ``Control.off`` value, or None to leave the option out."""
        values = {}
        for option in CONTROLLED:
            if option.target not in targets:
                continue
            value = getattr(self, option.name).value
            if not self._enabled(option):
                value = option.control.off if option.control.off is not None else value
                if option.target in (SEARCH, TRAINING):
                    value = None
            values[option.name] = value
        return values

    def config(self):
        """The QuantConfig the controls describe."""
        values = self._control_values((SCHEME, CONFIG))
        for option in PANEL_OPTIONS:  # the layer list and the per-layer precisions
            if option.kind == "patterns":
                values[option.name] = tuple(self.keep_fp32.value)
            elif option.kind == "pairs":
                values[option.name] = self.layer_precision.presets_in_use()
        return build_config(self.preset.value, values)

    def run_options(self) -> dict[str, Any]:
        """The search and training options of the controls (``actions.quantize`` keywords):
        a disabled control's option is left out (None)."""
        values = self._control_values((SEARCH, TRAINING))
        values["keep_most_sensitive"] = self.keep_most_sensitive.value
        values["max_drop"] = self.max_drop.value if self.mixed_precision.value else None
        return values
