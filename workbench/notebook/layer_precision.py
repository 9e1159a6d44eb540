"""The panel's per-layer precision chooser: select layers in the list, pick a precision, Set.

A precision is a preset's weight and activation schemes (QuantConfig's per-layer table, as
``%quantize --override LAYER=PRESET``), FP32 (the panel's keep-FP32 list), or
the config's own. The list shows each layer's choice next to its name. Nothing here
quantizes: ``presets`` is what the panel's config is built from (``recipe.build_config``).
"""

from __future__ import annotations

from collections.abc import Iterable

import ipywidgets as widgets

from workbench.errors import ConfigError
from workbench.notebook import actions

CONFIG = "config"
FP32 = "FP32"


class LayerPrecision:
    """The layer list, the precision dropdown and the Set button.

    Attributes
    ----------
    presets : dict
        Layer name -> preset name, for the layers set to a preset (in the order set).
    """

    def __init__(self, names: list[str], keep_fp32: widgets.SelectMultiple) -> None:
        self.names = list(names)
        self.keep_fp32 = keep_fp32
        self.presets: dict[str, str] = {}
        style = {"description_width": "initial"}
        self.layers = widgets.SelectMultiple(
            options=self._options(),
            value=(),
            rows=min(8, max(2, len(self.names))),
            description="layer precision",
            style=style,
        )
        choices = [("the config's", CONFIG), ("FP32", FP32)]
        choices += [(name, name) for name in actions.PRESET_NAMES]
        self.precision = widgets.Dropdown(options=choices, value=CONFIG, description="set to")
        self.set_button = widgets.Button(
            description="Set precision", tooltip="give the selected layers this precision"
        )
        self.set_button.on_click(self._on_set)
        keep_fp32.observe(self._refresh, names="value")
        beside = widgets.VBox([self.precision, self.set_button])
        beside.layout.flex = "0 0 auto"  # the list gives way, not the dropdown
        beside.layout.overflow = "visible"
        self.box = widgets.HBox([self.layers, beside])

    def label(self, name: str) -> str:
        """The layer's name and its choice (``fc1: int8``, ``conv: FP32``), or the name."""
        if name in self.keep_fp32.value:
            return f"{name}: {FP32}"
        if name in self.presets:
            return f"{name}: {self.presets[name]}"
        return name

    def set(self, names: Iterable[str], precision: str) -> None:
        """Give ``names`` the ``precision``: a preset name, ``"FP32"`` or ``"config"``."""
        names = list(names)
        unknown = [name for name in names if name not in self.names]
        if unknown:
            raise ConfigError(
                f"{', '.join(unknown)} is not a quantizable layer of this model; choose from "
                "the panel's layer list"
            )
        for name in names:
            self.presets.pop(name, None)
            if precision not in (CONFIG, FP32):
                self.presets[name] = precision
        kept = [n for n in self.keep_fp32.value if n not in names]
        if precision == FP32:
            kept += names
        # keep_fp32's value watcher refreshes the labels; set them here too when it is unchanged
        self.keep_fp32.value = tuple(n for n in self.names if n in kept)
        self._refresh()

    def presets_in_use(self) -> dict[str, str]:
        """``presets`` without the layers kept FP32 (FP32 wins, as in the engine)."""
        return {n: p for n, p in self.presets.items() if n not in self.keep_fp32.value}

    def set_patterns(self, pairs: Iterable[tuple[str, str]]) -> None:
        """``%quantize --override`` pairs (pattern, preset), later ones winning."""
        for pattern, preset in pairs:
            self.set(actions.layers_matching(self.names, (pattern,)), preset)

    def _on_set(self, _button=None) -> None:
        self.set(self.layers.value, self.precision.value)

    def _options(self) -> list[tuple[str, str]]:
        return [(self.label(name), name) for name in self.names]

    def _refresh(self, _change=None) -> None:
        selected = self.layers.value
        self.layers.options = self._options()
        self.layers.value = selected
