"""The report as styled HTML: the text/html fallback, the panel's tabs, the standalone file.

It renders the same JSON bundle as the JupyterLab renderer (``report_json.py``) into the
same elements and class names, styled by the one stylesheet both use
(``report_view.css``): summary cards, the per-layer SQNR chart with its bands, the layer
table (its own scroll area, sticky header and first column, the reason of an FP32 layer in
a tooltip), storage bars on a per-row scale. Every model-supplied string is escaped.
The standalone page adds a small inline script (sort, filter, hide FP32, click a bar) and
a dark palette for ``prefers-color-scheme: dark``; the other uses carry no script.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from workbench.analysis.html.elements import element, esc, shorten_middle, stylesheet
from workbench.analysis.html.format import (
    format_bytes,
    format_db,
    format_ratio,
    is_number,
    significant,
)
from workbench.analysis.html.parts import (
    frame_html,
    layer_table_html,
    sqnr_chart_svg,
    table_html,
)
from workbench.analysis.html.storage import storage_html
from workbench.analysis.sqnr_bands import SQNR_GOOD_DB, sqnr_band

__all__ = [
    "SECTIONS",
    "frame_html",
    "report_view_html",
    "shorten_middle",
    "stylesheet",
    "summary_html",
    "table_html",
]

SECTIONS = ("summary", "chart", "layers", "storage", "tables")
WORST_LISTED = 5


# summary -------------------------------------------------------------------------------------
def metric_label(summary: dict[str, Any]) -> str:
    """The metric's name: the eval_fn's name when it has one."""
    name = summary.get("metric_name")
    return f"{name} (eval_fn)" if name else "eval_fn metric"


def poor_layers(layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Quantized layers whose output SQNR is below the good band, worst first."""
    below = [
        row
        for row in layers
        if row.get("status") == "quantized"
        and is_number(row.get("output_sqnr_db"))
        and row["output_sqnr_db"] < SQNR_GOOD_DB
    ]
    return sorted(below, key=lambda row: row["output_sqnr_db"])


def layers_detail(summary: dict[str, Any]) -> str:
    """``53 folded, 1 kept FP32``: a folded layer (BatchNorm into its conv) is not kept FP32."""
    kept = f"{summary['layers_fp32']} kept FP32"
    folded = summary.get("layers_folded") or 0
    return f"{folded} folded, {kept}" if folded else kept


def _card(label: str, value: str, detail: str = "", band: str | None = None) -> str:
    cls = "jp-WorkbenchReport-card" + (f" jp-mod-{band}" if band else "")
    inner = element("div", "jp-WorkbenchReport-cardLabel", label)
    inner += element("div", "jp-WorkbenchReport-cardValue", value)
    if detail:
        inner += element("div", "jp-WorkbenchReport-cardDetail", detail)
    return f'<div class="{cls}">{inner}</div>'


def summary_html(bundle: dict[str, Any], meta: list[str] | None = None) -> str:
    s = bundle["summary"]
    title = element("span", "jp-WorkbenchReport-heading", "Quantization report")
    title += element("span", "jp-WorkbenchReport-config", s.get("config", ""))
    for item in meta or ():
        title += element("span", "jp-WorkbenchReport-meta", item)
    cards = [
        _card(
            "Size FP32 \u2192 quantized",
            f"{format_bytes(s['fp32_bytes'])} \u2192 {format_bytes(s['quantized_bytes'])}",
            f"{format_ratio(s['compression_ratio'])} smaller",
        ),
        _card("Layers", f"{s['layers_quantized']} quantized", layers_detail(s)),
    ]
    if is_number(s.get("metric_fp32")) and is_number(s.get("metric_quantized")):
        drop = s["metric_fp32"] - s["metric_quantized"]
        word = "drop" if drop >= 0 else "gain"
        cards.append(
            _card(
                f"{metric_label(s)}: FP32 \u2192 quantized",
                f"{significant(s['metric_fp32'], 4)} \u2192 "
                f"{significant(s['metric_quantized'], 4)}",
                f"{word} {significant(abs(drop))} (in the metric's own unit)",
            )
        )
    else:
        cards.append(_card("Metric", "not measured", "pass eval_fn(model) -> float"))
    mean = s.get("mean_output_sqnr_db")
    cards.append(
        _card(
            "Layer output SQNR vs FP32",
            f"mean {format_db(mean)}",
            f"worst {format_db(s.get('worst_output_sqnr_db'))}",
            sqnr_band(mean),
        )
    )
    if is_number(s.get("model_output_sqnr_db")):
        cosine = s.get("model_output_cosine")
        cards.append(
            _card(
                "Model output SQNR vs FP32",
                format_db(s["model_output_sqnr_db"]),
                f"cosine {cosine:.3f}" if is_number(cosine) else "",
                sqnr_band(s["model_output_sqnr_db"]),
            )
        )
    body = element("div", "jp-WorkbenchReport-title", None).replace("></div>", f">{title}</div>")
    body += '<div class="jp-WorkbenchReport-cards">' + "".join(cards) + "</div>"
    poor = poor_layers(bundle["layers"])
    if poor:
        items = ", ".join(
            element("code", "jp-WorkbenchReport-layerName", row["layer"])
            + esc(f" {format_db(row['output_sqnr_db'])}")
            for row in poor[:WORST_LISTED]
        )
        more = f" and {len(poor) - WORST_LISTED} more" if len(poor) > WORST_LISTED else ""
        below = f"Layers below {SQNR_GOOD_DB:.0f} dB: "
        label = element("span", "jp-WorkbenchReport-cardLabel", below)
        body += f'<div class="jp-WorkbenchReport-worst">{label}{items}{esc(more)}</div>'
    return f'<div class="jp-WorkbenchReport-summary">{body}</div>'


# the whole view ------------------------------------------------------------------------------
def section_title(text: str) -> str:
    return element("h4", "jp-WorkbenchReport-sectionTitle", text)


def report_view_html(
    bundle: dict[str, Any],
    sections: Iterable[str] = SECTIONS,
    meta: list[str] | None = None,
    interactive: bool = False,
    with_style: bool = True,
) -> str:
    """The report view of a JSON bundle: the given sections, in the order of ``SECTIONS``."""
    wanted = set(sections)
    parts = []
    if "summary" in wanted:
        parts.append(summary_html(bundle, meta))
    if "chart" in wanted and bundle["layers"]:
        parts.append(section_title("Output SQNR per layer") + sqnr_chart_svg(bundle["layers"]))
    if "layers" in wanted:
        parts.append(section_title("Layers") + layer_table_html(bundle["layers"], interactive))
    if "storage" in wanted:
        folded_into = {row["layer"]: row.get("folded_into") for row in bundle["layers"]}
        parts.append(section_title("Storage") + storage_html(bundle["storage"], folded_into))
    if "tables" in wanted:
        for title, table in bundle.get("tables", {}).items():
            parts.append(section_title(title) + table_html(table["columns"], table["rows"]))
    style = f"<style>{stylesheet()}</style>" if with_style else ""
    return f'{style}<div class="jp-WorkbenchReport workbench-report">{"".join(parts)}</div>'
