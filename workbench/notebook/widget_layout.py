"""How the panel's widgets fit the page and show their values: layer lists as wide as their
longest name, and a dropdown whose None option reads as its label, not a blank."""

from __future__ import annotations

import ipywidgets as widgets

CHAR_PX = 7.5  # a layer name's character in the lists' font, about

LIST_LABEL_PX = 190  # the description ("layer precision") and the scroll bar

LIST_SUFFIX_CHARS = 14  # the precision shown after a name (": int4-weight")

PRECISION_PX = 320  # the "set to" dropdown and Set button beside the layer-precision list


def fit_layer_lists(*lists: tuple[widgets.SelectMultiple, int]) -> None:
    """Widen the layer lists to their longest name (BERT's ``encoder.layer.11.attention...``
    would be cut at the default 220 px), within the panel's width less ``beside`` px of
    the controls next to the list."""
    for select, beside in lists:
        labels = [o[0] if isinstance(o, tuple) else o for o in select.options]
        longest = max((len(str(label)) for label in labels), default=0)
        width = LIST_LABEL_PX + CHAR_PX * (longest + LIST_SUFFIX_CHARS)
        select.layout.width = f"min(calc(100% - {beside}px), {width:.0f}px)"


def show_none_option(dropdown: widgets.Dropdown) -> None:
    """A dropdown whose value is None shows a blank: select its None option by index
    (``("off", None)`` then reads "off"), now and whenever the value becomes None again."""

    def option_values() -> list:
        return [o[1] if isinstance(o, tuple) else o for o in dropdown.options]

    if None not in option_values():
        return

    def select_none(_change=None) -> None:
        options = option_values()
        if dropdown.index is None and None in options:
            dropdown.index = options.index(None)

    dropdown.observe(select_none, names="index")
    select_none()
