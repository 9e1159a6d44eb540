"""The report view's per-layer parts as HTML: the SQNR chart (inline SVG on the bands), the
layer table (sticky header and first column, the FP32 reason in a tooltip), the storage bars
(each row on its own scale) and plain tables. ``report_html.py`` puts them together."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from workbench.analysis.html.elements import element, esc, shorten_middle
from workbench.analysis.html.format import (
    MISSING,
    format_cell,
    format_db,
    is_number,
    significant,
)
from workbench.analysis.sqnr_bands import SQNR_GOOD_DB, SQNR_POOR_DB, sqnr_band

CHART_HEIGHT = 190
TABLE_NAME_CHARS = 30  # the layer table's names, shortened in the middle beyond this
CHART_TOP_DB = 50.0


# chart -------------------------------------------------------------------------------------
def chart_top_db(layers: list[dict[str, Any]]) -> float:
    values = [row["output_sqnr_db"] for row in layers if is_number(row.get("output_sqnr_db"))]
    top = max([CHART_TOP_DB, *values])
    return float(10 * -(-top // 10))


def sqnr_chart_svg(layers: list[dict[str, Any]]) -> str:
    """Output SQNR per layer in model order, on the poor / fair / good bands. FP32 layers
    are short grey stubs; each bar's tooltip names its layer and value."""
    left, right, top, bottom = 44, 8, 8, 22
    # 100 layers fit a 1400 px window with the sidebar open
    step = 14 if len(layers) <= 60 else 8 if len(layers) <= 110 else 6
    plot_w = max(400, step * len(layers))
    width = left + plot_w + right
    plot_h = CHART_HEIGHT - top - bottom
    top_db = chart_top_db(layers)

    def y(db: float) -> float:
        return top + plot_h * (1 - min(max(db, 0.0), top_db) / top_db)

    parts = []
    bands = (("poor", 0.0, SQNR_POOR_DB), ("fair", SQNR_POOR_DB, SQNR_GOOD_DB))
    bands += (("good", SQNR_GOOD_DB, top_db),)
    for band, low, high in bands:
        parts.append(
            f'<rect class="jp-WorkbenchReport-band jp-mod-{band}" x="{left}" y="{y(high):.1f}" '
            f'width="{plot_w}" height="{y(low) - y(high):.1f}"/>'
        )
    for db in range(0, int(top_db) + 1, 10):
        parts.append(f'<line x1="{left - 4}" x2="{left}" y1="{y(db):.1f}" y2="{y(db):.1f}"/>')
        parts.append(f'<text x="{left - 6}" y="{y(db) + 4:.1f}" text-anchor="end">{db}</text>')
    parts.append(
        f'<text x="12" y="{top + plot_h / 2:.0f}" text-anchor="middle" '
        f'transform="rotate(-90 12 {top + plot_h / 2:.0f})">dB</text>'
    )
    bar_w = max(2, step - 3)
    for index, row in enumerate(layers):
        value = row.get("output_sqnr_db")
        x = left + index * step + (step - bar_w) / 2
        if is_folded(row):
            cls, height = "fp32", 4.0
            label = f"{row['layer']}: folded into {row['folded_into']}"
        elif row.get("status") != "quantized":
            cls, height = "fp32", 4.0
            label = f"{row['layer']}: kept FP32"
        elif is_number(value):
            cls, height = sqnr_band(value), y(0) - y(value)
            label = f"{row['layer']}: output SQNR {format_db(value)}"
        else:
            cls, height = "good", y(0) - y(top_db)
            label = f"{row['layer']}: output SQNR exact or not measured"
        parts.append(
            f'<rect class="jp-WorkbenchReport-sqnrBar jp-mod-{cls}" '
            f'data-layer="{esc(row["layer"])}" '
            f'x="{x:.1f}" y="{y(0) - height:.1f}" width="{bar_w}" height="{max(height, 1):.1f}">'
            f"<title>{esc(label)}</title></rect>"
        )
    parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(0):.1f}" y2="{y(0):.1f}"/>')
    parts.append(
        f'<text x="{left}" y="{CHART_HEIGHT - 6}">layers in model order ({len(layers)}); '
        f"bands: poor &lt; {SQNR_POOR_DB:.0f} dB \u2264 fair &lt; {SQNR_GOOD_DB:.0f} dB "
        "\u2264 good; grey: kept FP32 or folded</text>"
    )
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" viewBox="0 0 {width} {CHART_HEIGHT}" '
        f'width="{width}" height="{CHART_HEIGHT}" aria-label="Output SQNR per layer">'
        + "".join(parts)
        + "</svg>"
    )
    return f'<div class="jp-WorkbenchReport-chart">{svg}</div>'


# layer table ---------------------------------------------------------------------------------
def _scale_range(row: dict[str, Any]) -> str:
    if is_number(row.get("scale_min")) and is_number(row.get("scale_max")):
        return f"{significant(row['scale_min'])} \u2026 {significant(row['scale_max'])}"
    return MISSING


def _sqnr_cell(column: str):
    return lambda row: (format_db(row.get(column)), sqnr_band(row.get(column)), row.get(column))


def _plain(column: str):
    return lambda row: (format_cell(row.get(column)), None, row.get(column))


# (id, label, tooltip, numeric, cell(row) -> (text, band, sort value))
LAYER_COLUMNS = (
    ("layer", "Layer", "Module name in the model", False, _plain("layer")),
    ("type", "Type", "Module type", False, _plain("type")),
    ("status", "Status", "Quantized, or kept FP32 (hover for the reason)", False, None),
    ("scheme", "Scheme", "Weight quantization scheme", False, _plain("scheme")),
    ("bits", "Bits", "Weight bits", True, _plain("bits")),
    ("activation_bits", "Act. bits", "Input activation bits (empty: FP32 input)", True,
     _plain("activation_bits")),
    ("weight_sqnr_db", "Weight SQNR", "Quantized weights against FP32 weights", True,
     _sqnr_cell("weight_sqnr_db")),
    ("layer_sqnr_db", "Layer SQNR", "The quantized layer alone, fed the FP32 input", True,
     _sqnr_cell("layer_sqnr_db")),
    ("output_sqnr_db", "Output SQNR",
     "The layer's output in the quantized model against FP32 (earlier errors included)", True,
     _sqnr_cell("output_sqnr_db")),
    ("output_cosine", "Cosine", "Cosine similarity of the layer output to FP32", True,
     lambda row: (f"{row['output_cosine']:.3f}" if is_number(row.get("output_cosine"))
                  else MISSING, None, row.get("output_cosine"))),
    ("num_scales", "Scales", "Number of weight scales (one per channel when per-channel)",
     True, _plain("num_scales")),
    ("scale_range", "Scale range", "Smallest and largest weight scale", True,
     lambda row: (_scale_range(row), None, row.get("scale_max"))),
    ("zero_point", "Zero point", "Weight zero point(s)", False, _plain("zero_point")),
)  # fmt: skip
# shown only when some layer has a value (SmoothQuant on)
OPTIONAL_LAYER_COLUMNS = (
    ("smoothing", "Smoothing",
     "SmoothQuant: where 1/s went (layernorm, linear or mul) and alpha, or why not smoothed",
     False, _plain("smoothing")),
)  # fmt: skip


# hidden in the standalone page until chosen (the JupyterLab renderer does the same); the
# smoothing column shows whenever SmoothQuant ran
CHOSEN_COLUMNS = {"scheme", "num_scales", "scale_range", "zero_point"}


def layer_columns(layers: list[dict[str, Any]]) -> tuple:
    """The layer table's columns: ``LAYER_COLUMNS`` and the optional ones some layer fills."""
    optional = tuple(c for c in OPTIONAL_LAYER_COLUMNS if any(row.get(c[0]) for row in layers))
    return LAYER_COLUMNS + optional


def is_folded(row: dict[str, Any]) -> bool:
    """A layer folded away (BatchNorm into the conv before it): no bytes of its own."""
    if row.get("status") != "fp32":
        return False
    return bool(row.get("folded_into"))


def status_badge(row: dict[str, Any]) -> str:
    """A short status; the reason of an FP32 layer in the tooltip (and a marker)."""
    if row.get("status") == "quantized":
        precision = row.get("precision") or "quantized"  # "kept 8-bit" above the config
        title = (row.get("reason") or None) if precision != "quantized" else None
        return element("span", "jp-WorkbenchReport-badge jp-mod-quantized", precision, title=title)
    folded = is_folded(row)
    reason = row.get("reason") or ""
    badge = element(
        "span",
        "jp-WorkbenchReport-badge" + (" jp-mod-folded" if folded else ""),
        "folded" if folded else "FP32",
        title=reason or None,
    )
    if reason:
        badge += element("span", "jp-WorkbenchReport-reason", "?", title=reason)
    return badge


def column_chooser_html(columns: tuple, hidden: set[str]) -> str:
    """The "Columns" chooser of the standalone page (its script shows / hides them)."""
    boxes = "".join(
        f'<label title="{esc(tooltip)}"><input type="checkbox" data-column="{column}"'
        f"{'' if column in hidden else ' checked'}> {esc(label)}</label>"
        for column, label, tooltip, _, _ in columns
        if column != "layer"
    )
    return (
        '<details class="jp-WorkbenchReport-columns"><summary title="Choose the columns to '
        f'show">Columns</summary><div class="jp-WorkbenchReport-columnList">{boxes}</div>'
        "</details>"
    )


def layer_table_html(layers: list[dict[str, Any]], interactive: bool = False) -> str:
    """The layer table; ``interactive`` (the standalone page, with its script): the columns
    of ``CHOSEN_COLUMNS`` hidden until chosen, so that the rest fit 1400 px."""
    columns = layer_columns(layers)
    hidden = CHOSEN_COLUMNS if interactive else set()

    def hide(column: str) -> str | None:
        return "" if column in hidden else None

    head = "".join(
        element(
            "th",
            "jp-mod-numeric" if numeric else None,
            label,
            title=f"{tooltip}. Click to sort." if interactive else tooltip,
            data_column=column,
            hidden=hide(column),
        )
        for column, label, tooltip, numeric, _ in columns
    )
    rows = []
    for index, row in enumerate(layers):
        cells = []
        for column, _, _, numeric, cell in columns:
            classes = ["jp-mod-numeric"] if numeric else []
            if column == "status":
                body, sort_value = status_badge(row), row.get("status")
            elif column == "layer":
                name = row["layer"]
                short = shorten_middle(name, TABLE_NAME_CHARS)
                body = element("code", "jp-WorkbenchReport-layerName", short, title=name)
                sort_value = row["layer"]
            else:
                text, band, sort_value = cell(row)
                body = esc(text)
                if band:
                    classes.append(f"jp-mod-{band}")
            sort_attr = f' data-sort="{esc(sort_value)}"' if is_number(sort_value) else ""
            cls = f' class="{" ".join(classes)}"' if classes else ""
            hidden_attr = " hidden" if column in hidden else ""
            cells.append(f'<td{cls} data-column="{column}"{sort_attr}{hidden_attr}>{body}</td>')
        fp32 = ' class="jp-WorkbenchReport-fp32"' if row.get("status") != "quantized" else ""
        rows.append(
            f"<tr{fp32} "
            f'data-status="{esc(row.get("status"))}" data-index="{index}" '
            f'data-layer="{esc(row["layer"])}">' + "".join(cells) + "</tr>"
        )
    table = (
        '<table class="jp-WorkbenchReport-table jp-WorkbenchReport-layerTable">'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )
    count = element("span", "jp-WorkbenchReport-count", f"{len(layers)} of {len(layers)} layers")
    toolbar = count
    if interactive:
        toolbar = (
            '<input class="jp-WorkbenchReport-filter" type="search" '
            'placeholder="Filter layers by name" aria-label="Filter layers by name">'
            '<button type="button" class="jp-WorkbenchReport-worstFirst">Worst first</button>'
            '<label><input type="checkbox" class="jp-WorkbenchReport-hideFp32"> '
            "hide FP32 / folded</label>" + column_chooser_html(columns, hidden) + count
        )
    return (
        '<div class="jp-WorkbenchReport-layers">'
        f'<div class="jp-WorkbenchReport-toolbar">{toolbar}{legend_html()}</div>'
        f'<div class="jp-WorkbenchReport-tableScroll">{table}</div></div>'
    )


def legend_html() -> str:
    items = (
        ("poor", f"< {SQNR_POOR_DB:.0f} dB"),
        ("fair", f"{SQNR_POOR_DB:.0f}\u2013{SQNR_GOOD_DB:.0f} dB"),
        ("good", f"\u2265 {SQNR_GOOD_DB:.0f} dB"),
    )
    swatches = "".join(
        f'<span class="jp-WorkbenchReport-swatch" style="background:var(--wb-{band})">'
        f"{esc(text)}</span>"
        for band, text in items
    )
    return f'<span class="jp-WorkbenchReport-legend">SQNR: {swatches}</span>'


# further tables ----------------------------------------------------------------------------
def table_html(
    columns: Iterable[str], rows: Iterable[Iterable[Any]], headers: dict[str, str] | None = None
) -> str:
    """A plain styled table: friendly headers when given, every cell through format_cell."""
    columns = list(columns)
    headers = headers or {}
    head = "".join(element("th", None, headers.get(c, c.replace("_", " "))) for c in columns)
    body = []
    for row in rows:
        cells = "".join(
            element("td", "jp-mod-numeric" if is_number(v) else None, format_cell(v)) for v in row
        )
        body.append(f"<tr>{cells}</tr>")
    return (
        '<div class="jp-WorkbenchReport-scroll"><table class="jp-WorkbenchReport-table">'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
    )


def frame_html(frame, headers: dict[str, str] | None = None) -> str:
    """A DataFrame as a styled table (no index, no NaN / <NA>, numbers positional)."""
    return table_html([str(c) for c in frame.columns], frame.itertuples(index=False), headers)
