"""Views of a sensitivity table (``wb.sensitivity``): what each layer costs.

``sensitivity_chart_svg`` and ``sensitivity_table_html`` are the panel's: inline SVG and HTML
in the report view's classes (``report_view.css``: theme colours, 11 px and larger text),
one row per layer with its name, so that 100 layers stay readable in a scroll box.
``sensitivity_chart`` is the matplotlib figure for notebooks.

With ``eval_fn`` the table ranks by the metric's drop from FP32; without it, by the model
output's SQNR (dB) against FP32 with only that layer quantized (lowest first).
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from workbench.analysis.html.elements import element, esc, shorten_middle
from workbench.analysis.html.format import MISSING, format_db, is_number, significant
from workbench.analysis.sqnr_bands import SQNR_GOOD_DB, SQNR_POOR_DB, sqnr_band

SQNR_METRIC = "output_sqnr_db"
ROW_PX = 20
NAME_PX = 300
BARS_PX = 420
VALUE_PX = 90
NAME_CHARS = 40
TOP_DB = 50.0


def uses_output_sqnr(table: pd.DataFrame) -> bool:
    """True when the table was ranked without ``eval_fn`` (by the model output's SQNR)."""
    return table.attrs.get("metric", SQNR_METRIC) == SQNR_METRIC


def chart_caption(table: pd.DataFrame) -> str:
    """What the chart shows, in one sentence (the metric named)."""
    if uses_output_sqnr(table):
        return (
            "No eval_fn given: each layer is ranked by the model output's SQNR against FP32 "
            "(dB, higher is better) with only that layer quantized, lowest (most sensitive) "
            f"first; bands: poor < {SQNR_POOR_DB:.0f} dB \u2264 fair < {SQNR_GOOD_DB:.0f} dB "
            "\u2264 good. The table adds the output cosine."
        )
    baseline = table.attrs.get("metric_fp32")
    fp32 = f" (FP32 {significant(baseline, 4)})" if is_number(baseline) else ""
    return (
        f"eval_fn's drop from FP32{fp32}, in its own unit, most sensitive first: red with "
        "only this layer quantized, blue with every layer but this one quantized."
    )


def _sqnr_values(table: pd.DataFrame) -> list[float]:
    return [float(v) for v in table["metric_only_this_quantized"]]


def _drops(table: pd.DataFrame) -> tuple[list[float], list[float]]:
    baseline = float(table.attrs.get("metric_fp32", math.nan))
    only = [baseline - float(v) for v in table["metric_only_this_quantized"]]
    all_but = [baseline - float(v) for v in table["metric_all_but_this_quantized"]]
    return only, all_but


def _text(x: float, y: float, content: str, anchor: str = "start", title: str = "") -> str:
    tip = f"<title>{esc(title)}</title>" if title else ""
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}">{tip}{esc(content)}</text>'


def sensitivity_chart_svg(table: pd.DataFrame) -> str:
    """Horizontal bars, one row per layer in the table's order (most sensitive first), the
    layer names at the left (shortened in the middle, the full name on hover), the value at
    the end of each bar. Without ``eval_fn``: output SQNR with only this layer quantized on
    the poor / fair / good bands; with it: the metric's drop, only this / all but this."""
    sqnr = uses_output_sqnr(table)
    rows = len(table)
    top, axis_h = 6, 24
    height = top + ROW_PX * max(rows, 1) + axis_h
    left = NAME_PX
    width = NAME_PX + BARS_PX + VALUE_PX
    parts: list[str] = []
    values, (only, all_but) = (_sqnr_values(table), ([], [])) if sqnr else ([], _drops(table))
    low, high = _value_range(values if sqnr else only + all_but, sqnr)

    def x(value: float) -> float:
        clipped = min(max(value, low), high)
        return left + BARS_PX * (clipped - low) / (high - low)

    plot_bottom = top + ROW_PX * rows
    if sqnr:
        bands = (("poor", low, SQNR_POOR_DB), ("fair", SQNR_POOR_DB, SQNR_GOOD_DB))
        bands += (("good", SQNR_GOOD_DB, high),)
        for band, start, end in bands:
            parts.append(
                f'<rect class="jp-WorkbenchReport-band jp-mod-{band}" x="{x(start):.1f}" '
                f'y="{top}" width="{x(end) - x(start):.1f}" height="{ROW_PX * rows}"/>'
            )
    for index, (_, row) in enumerate(table.iterrows()):
        y0 = top + index * ROW_PX
        name = str(row["layer"])
        parts.append(
            _text(left - 6, y0 + ROW_PX / 2 + 4, shorten_middle(name, NAME_CHARS), "end", name)
        )
        if sqnr:
            value = values[index]
            band = "good" if value == math.inf else (sqnr_band(value) or "poor")
            end = x(high) if value == math.inf else x(value) if value == value else x(low)
            label = format_db(value)
            parts.append(
                f'<rect class="jp-WorkbenchReport-sensBar jp-WorkbenchReport-sqnrBar '
                f'jp-mod-{band}" data-layer="{esc(name)}" x="{x(low):.1f}" y="{y0 + 4}" '
                f'width="{max(end - x(low), 1.0):.1f}" height="{ROW_PX - 8}">'
                f"<title>{esc(name)}: model output SQNR {esc(label)} with only this layer "
                "quantized</title></rect>"
            )
            parts.append(_text(left + BARS_PX + 6, y0 + ROW_PX / 2 + 4, label))
        else:
            for offset, values_of, cls, what in (
                (3, only, "jp-mod-only", "only this layer quantized"),
                (ROW_PX / 2, all_but, "jp-mod-allBut", "every layer but this one quantized"),
            ):
                value = values_of[index]
                start, end = sorted((x(0.0), x(value)))
                parts.append(
                    f'<rect class="jp-WorkbenchReport-sensBar {cls}" data-layer="{esc(name)}" '
                    f'x="{start:.1f}" y="{y0 + offset:.1f}" width="{max(end - start, 1.0):.1f}" '
                    f'height="{ROW_PX / 2 - 3:.1f}"><title>{esc(name)}: drop '
                    f"{esc(significant(value))} with {what}</title></rect>"
                )
            parts.append(_text(left + BARS_PX + 6, y0 + ROW_PX / 2 + 4, significant(only[index])))
    parts.append(f'<line x1="{x(low):.1f}" x2="{x(low):.1f}" y1="{top}" y2="{plot_bottom}"/>')
    if not sqnr and low < 0:
        parts.append(f'<line x1="{x(0):.1f}" x2="{x(0):.1f}" y1="{top}" y2="{plot_bottom}"/>')
    parts.append(f'<line x1="{left}" x2="{left + BARS_PX}" y1="{plot_bottom}" y2="{plot_bottom}"/>')
    for tick in nice_ticks(low, high):
        parts.append(
            f'<line x1="{x(tick):.1f}" x2="{x(tick):.1f}" y1="{plot_bottom}" '
            f'y2="{plot_bottom + 4}"/>'
        )
        label = f"{tick:g}" if sqnr else significant(tick)
        parts.append(_text(x(tick), plot_bottom + 16, label, "middle"))
    unit = "dB, output SQNR with only this layer quantized" if sqnr else "drop from FP32"
    parts.append(_text(left + BARS_PX + 6, plot_bottom + 16, "dB" if sqnr else "drop", title=unit))
    return _chart_html(table, parts, width, height)


def _value_range(values: list[float], sqnr: bool) -> tuple[float, float]:
    """The bars' axis: whole tens of dB from 0 (or below) to at least ``TOP_DB`` for output
    SQNR; for metric drops, from 0 (or the largest gain) to the largest drop, padded 5%."""
    finite = [v for v in values if math.isfinite(v)]
    if sqnr:
        high = float(10 * math.ceil(max([TOP_DB, *finite]) / 10))
        low = min(0.0, *finite) if finite else 0.0
        return float(10 * math.floor(low / 10)), high
    high = max([0.0, *finite]) or 1.0
    low = min([0.0, *finite])
    pad = 0.05 * (high - low)
    return (low - pad if low < 0 else 0.0), high + pad


def _chart_html(table: pd.DataFrame, parts: list[str], width: float, height: float) -> str:
    """The SVG of ``parts`` with the chart's caption."""
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" aria-label="Layer sensitivity">'
        + "".join(parts)
        + "</svg>"
    )
    caption = element("p", "jp-WorkbenchReport-caption", chart_caption(table))
    return (
        f'<div class="jp-WorkbenchReport-sensitivity">{caption}'
        f'<div class="jp-WorkbenchReport-chart jp-WorkbenchReport-sensChart">{svg}</div></div>'
    )


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round ticks between ``low`` and ``high``."""
    span = high - low
    if span <= 0:
        return [low]
    raw = span / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    ticks = []
    value = first
    while value <= high + 1e-9 * span:
        ticks.append(0.0 if abs(value) < 1e-12 * span else value)
        value += step
    return ticks


# the table ---------------------------------------------------------------------------------
def table_columns(table: pd.DataFrame) -> list[tuple[str, str, str]]:
    """(column, header, tooltip) of the shown columns: no drop column without a metric."""
    sqnr = uses_output_sqnr(table)
    metric = "Output SQNR" if sqnr else "Metric"
    columns = [
        ("layer", "Layer", "Module name in the model"),
        ("type", "Type", "Module type"),
        ("metric_only_this_quantized", f"{metric}, only this",
         "With only this layer quantized"),
        ("metric_all_but_this_quantized", f"{metric}, all but this",
         "With every layer but this one quantized"),
    ]  # fmt: skip
    if not sqnr:
        columns.append(("drop_only_this", "Drop, only this", "FP32 metric minus the first"))
    columns.append(
        ("output_cosine_only_this", "Output cosine, only this",
         "Cosine of the model output to FP32 with only this layer quantized")
    )  # fmt: skip
    return columns


def _cell(column: str, value: Any, sqnr: bool) -> tuple[str, str | None]:
    """(text, SQNR band) of one cell."""
    if column in ("metric_only_this_quantized", "metric_all_but_this_quantized") and sqnr:
        return format_db(value), sqnr_band(value) if is_number(value) else None
    if column == "output_cosine_only_this":
        return (f"{float(value):.4f}" if is_number(value) else MISSING), None
    if is_number(value):
        return significant(value, 4), None
    return (MISSING if value is None or value != value else str(value)), None


def sensitivity_table_html(table: pd.DataFrame, shown: pd.DataFrame | None = None) -> str:
    """The table in the report view's style: a count, its own scroll box with a sticky
    header, layer names shortened in the middle (full name on hover), numbers right-aligned
    with units. ``shown``: the rows to show (filtered / sorted), default all."""
    shown = table if shown is None else shown
    sqnr = uses_output_sqnr(table)
    columns = table_columns(table)
    numeric = {c for c, _, _ in columns} - {"layer", "type"}
    head = "".join(
        element("th", "jp-mod-numeric" if c in numeric else None, label, title=tip,
                data_column=c)
        for c, label, tip in columns
    )  # fmt: skip
    body = []
    for _, row in shown.iterrows():
        cells = []
        for column, _, _ in columns:
            value = row[column]
            if column == "layer":
                name = str(value)
                text = element(
                    "code", "jp-WorkbenchReport-layerName", shorten_middle(name), title=name
                )
                cells.append(f'<td data-column="layer">{text}</td>')
                continue
            text, band = _cell(column, value, sqnr)
            classes = ["jp-mod-numeric"] if column in numeric else []
            if band:
                classes.append(f"jp-mod-{band}")
            cls = f' class="{" ".join(classes)}"' if classes else ""
            cells.append(f'<td{cls} data-column="{column}">{esc(text)}</td>')
        body.append(f'<tr data-layer="{esc(row["layer"])}">{"".join(cells)}</tr>')
    count = element("span", "jp-WorkbenchReport-count", f"{len(shown)} of {len(table)} layers")
    return (
        f'<div class="jp-WorkbenchReport-layers">{count}'
        '<div class="jp-WorkbenchReport-tableScroll">'
        '<table class="jp-WorkbenchReport-table jp-WorkbenchReport-sensTable">'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div></div>"
    )


# matplotlib, for notebooks -----------------------------------------------------------------
def sensitivity_chart(table: pd.DataFrame):
    """A matplotlib bar chart of the table: with ``eval_fn``, the metric's drop from FP32
    with only that layer quantized and with all but that one (differences, not absolute
    values: on a 0-100 axis they would not show); without it, the model output's SQNR with
    only that layer quantized."""
    import matplotlib.pyplot as plt

    from workbench.analysis.plots import themed

    x = range(len(table))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(table) + 2), 3.8))
    if uses_output_sqnr(table):
        values = [min(v, 100.0) for v in _sqnr_values(table)]
        ax.bar(list(x), values, color="#1f77b4", label="only this layer quantized")
        ax.set_ylabel("model output SQNR (dB)")
        ax.set_title("Layer sensitivity without eval_fn: output SQNR, lowest first")
    else:
        only, all_but = _drops(table)
        ax.bar([i - 0.2 for i in x], only, width=0.4, color="#d62728",
               label="only this layer quantized")  # fmt: skip
        ax.bar([i + 0.2 for i in x], all_but, width=0.4, color="#1f77b4",
               label="all but this layer")  # fmt: skip
        ax.axhline(0.0, color="#888888", lw=0.8)
        ax.set_ylabel("eval_fn drop from FP32")
        ax.set_title("Layer sensitivity: eval_fn lost, most sensitive first")
    ax.set_xticks(list(x))
    ax.set_xticklabels(table["layer"], rotation=75, ha="right", fontsize=9)
    ax.legend(fontsize=9)
    themed(fig, ax)
    fig.tight_layout()
    plt.close(fig)
    return fig
