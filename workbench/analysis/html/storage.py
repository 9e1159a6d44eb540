"""The report's storage section as HTML: one bar per layer, FP32 bytes against what the
quantized layer stores (weights, scales, zero points, bias), the folded and kept layers marked,
and the totals."""

from __future__ import annotations

from typing import Any

from workbench.analysis.html.elements import element, esc, shorten_middle
from workbench.analysis.html.format import (
    format_bytes,
    format_ratio,
)

STORAGE_NAME_CHARS = 32  # the storage rows' names, with room for a badge

STORAGE_PARTS = (
    ("weight_bytes", "weights", "jp-WorkbenchReport-weights"),
    ("scale_bytes", "scales", "jp-WorkbenchReport-scales"),
    ("zero_point_bytes", "zero points", "jp-WorkbenchReport-zeroPoints"),
    ("bias_bytes", "bias", "jp-WorkbenchReport-bias"),
)


# storage ---------------------------------------------------------------------------------
def _bar(cls: str, part: float, whole: float, title: str) -> str:
    width = 100.0 * part / whole if whole > 0 else 0.0
    return (
        f'<div class="jp-WorkbenchReport-bar {cls}" style="width:{width:.3f}%" '
        f'title="{esc(title)}"></div>'
    )


def is_folded_storage(row: dict[str, Any], folded_into: dict[str, str] | None = None) -> bool:
    """A storage row of a folded layer: FP32 bytes of its own, nothing stored after folding."""
    if row.get("status") != "fp32" or row["total_bytes"] != 0:
        return False
    return bool((folded_into or {}).get(row["layer"])) or row["fp32_bytes"] > 0


def storage_scale_bytes(storage: list[dict[str, Any]]) -> int:
    """The bytes the full bar width stands for: the largest layer's FP32 or stored size,
    the one linear scale of every layer's bars."""
    layers = [row for row in storage if row.get("status")]
    return max([1, *(max(row["fp32_bytes"], row["total_bytes"]) for row in layers)])


def storage_row_html(
    row: dict[str, Any], scale_bytes: int, folded_into: dict[str, str] | None = None
) -> str:
    """One layer's two bars (FP32 above, stored below) on the shared scale; the TOTAL row on
    its own (its FP32 size is the full width)."""
    total = not row.get("status")
    name = "total" if total else row["layer"]
    classes = ["jp-WorkbenchReport-storageRow"]
    if total:
        classes.append("jp-WorkbenchReport-storageTotal")
    short = shorten_middle(name, STORAGE_NAME_CHARS)
    label = element("code", "jp-WorkbenchReport-layerName", short, title=name)
    folded = not total and is_folded_storage(row, folded_into)
    target = (folded_into or {}).get(name)
    if folded:
        classes.append("jp-WorkbenchReport-storageFolded")
        tip = f"folded into {target}" if target else "folded into the layer before it"
        label += element("span", "jp-WorkbenchReport-badge jp-mod-folded", "folded", title=tip)
    elif row.get("status") == "fp32":
        label += element("span", "jp-WorkbenchReport-badge", "FP32")
    whole = max(row["fp32_bytes"], row["total_bytes"], 1) if total else scale_bytes
    fp32_track = _bar("jp-WorkbenchReport-fp32Bar", row["fp32_bytes"], whole,
                      f"FP32: {format_bytes(row['fp32_bytes'])}")  # fmt: skip
    quant = ""
    if folded:
        quant = element(
            "span",
            "jp-WorkbenchReport-foldedNote",
            f"in {shorten_middle(target)}" if target else "folded",
            title=tip,
        )
    elif row.get("status") == "fp32":
        quant = _bar("jp-WorkbenchReport-fp32Kept", row["total_bytes"], whole,
                     f"kept FP32: {format_bytes(row['total_bytes'])}")  # fmt: skip
    else:
        for key, part, cls in STORAGE_PARTS:
            if row.get(key, 0) > 0:
                quant += _bar(cls, row[key], whole, f"{part}: {format_bytes(row[key])}")
    ratio = ""
    if row["total_bytes"] > 0:
        ratio = f" ({format_ratio(row['fp32_bytes'] / row['total_bytes'])})"
    numbers = f"{format_bytes(row['fp32_bytes'])} \u2192 {format_bytes(row['total_bytes'])}{ratio}"
    if folded:
        numbers = f"{format_bytes(row['fp32_bytes'])} \u2192 folded"
    return (
        f'<div class="{" ".join(classes)}" data-layer="{esc(name)}" '
        f'data-status="{esc(row.get("status") or "total")}" '
        f'data-fp32-bytes="{row["fp32_bytes"]}" data-total-bytes="{row["total_bytes"]}">'
        f'<div class="jp-WorkbenchReport-storageName">{label}</div>'
        '<div class="jp-WorkbenchReport-bars">'
        f'<div class="jp-WorkbenchReport-track">{fp32_track}</div>'
        f'<div class="jp-WorkbenchReport-track">{quant}</div></div>'
        f'<div class="jp-WorkbenchReport-storageNumbers">{esc(numbers)}</div></div>'
    )


def storage_html(storage: list[dict[str, Any]], folded_into: dict[str, str] | None = None) -> str:
    """Every layer on one linear scale (the full width is the largest layer), in model
    order, so that sizes compare at a glance: a 30 MiB embedding against a 2 KiB LayerNorm.
    Folded layers (a BatchNorm folded into its conv) are marked folded, not kept FP32; the
    legend lists the pieces present and states the scale."""
    layers = [row for row in storage if row.get("status")]
    totals = [row for row in storage if not row.get("status")]
    scale_bytes = storage_scale_bytes(storage)
    legend = [("jp-WorkbenchReport-fp32Bar", "FP32 (upper bar)")]
    for key, part, cls in STORAGE_PARTS:
        if any(row.get(key, 0) > 0 and row.get("status") == "quantized" for row in layers):
            legend.append((cls, part))
    if any(row.get("status") == "fp32" and row["total_bytes"] > 0 for row in layers):
        legend.append(("jp-WorkbenchReport-fp32Kept", "kept FP32"))
    legend_items = "".join(
        f'<span class="jp-WorkbenchReport-legendItem"><span class="jp-WorkbenchReport-legendSwatch '
        f'{cls}"></span>{esc(text)}</span>'
        for cls, text in legend
    )
    scale = element(
        "span",
        "jp-WorkbenchReport-storageScale",
        f"one linear scale for all layers: full width = {format_bytes(scale_bytes)} "
        "(the largest layer); the total on its own scale",
    )
    rows = "".join(storage_row_html(row, scale_bytes, folded_into) for row in layers)
    total = "".join(storage_row_html(row, scale_bytes, folded_into) for row in totals)
    return (
        '<div class="jp-WorkbenchReport-storage">'
        f'<div class="jp-WorkbenchReport-storageLegend">{legend_items}{scale}</div>'
        f'<div class="jp-WorkbenchReport-storageRows">{rows}</div>{total}</div>'
    )
