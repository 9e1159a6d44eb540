"""The panel's runs chart: metric (or the model output's SQNR when there is no eval_fn)
against size, one labelled point per run, Pareto-optimal runs in red, as inline SVG in the
report view's classes (theme colours, 11 px and larger text). The FP32 metric's dashed line,
and its legend entry, only when there is a metric."""

from __future__ import annotations

import math

import pandas as pd

from workbench.analysis.html.elements import esc
from workbench.analysis.html.format import significant
from workbench.analysis.sensitivity_plots import nice_ticks

WIDTH, HEIGHT = 560, 300
LEFT, RIGHT, TOP, BOTTOM = 64, 24, 34, 44


def _span(values: list[float]) -> tuple[float, float]:
    """A range around ``values`` with a margin, so that points and labels stay inside."""
    low, high = min(values), max(values)
    pad = max(0.12 * (high - low), 0.02 * max(abs(high), 1.0))
    return low - pad, high + pad


def _axis_names(plot_w: float, plot_h: float, has_metric: bool) -> list[str]:
    """The x axis's name under it, the y axis's turned beside it."""
    y_label = "metric (eval_fn)" if has_metric else "model output SQNR (dB)"
    middle = TOP + plot_h / 2
    return [
        f'<text x="{LEFT + plot_w / 2:.0f}" y="{HEIGHT - 8}" text-anchor="middle">'
        "size (KiB)</text>",
        f'<text x="14" y="{middle:.0f}" text-anchor="middle" '
        f'transform="rotate(-90 14 {middle:.0f})">{esc(y_label)}</text>',
    ]


def runs_chart_svg(frame: pd.DataFrame, column: str) -> str:
    """``frame``: ``RunsTable.frame``; ``column``: ``"metric"`` or ``"model_sqnr_db"``."""
    has_metric = column == "metric"
    sizes = (frame["size_bytes"].astype(float) / 1024).tolist()
    values = pd.to_numeric(frame[column], errors="coerce").tolist()
    fp32 = None
    if has_metric and frame["metric_fp32"].notna().any():
        fp32 = float(frame["metric_fp32"].dropna().iloc[-1])
    finite = [v for v in values if math.isfinite(v)]
    x_low, x_high = _span(sizes)
    y_low, y_high = _span(finite + ([fp32] if fp32 is not None else []) or [0.0])
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(v: float) -> float:
        return LEFT + plot_w * (v - x_low) / (x_high - x_low)

    def y(v: float) -> float:
        v = min(max(v, y_low), y_high) if math.isfinite(v) else y_high
        return TOP + plot_h * (1 - (v - y_low) / (y_high - y_low))

    optimal = frame["pareto_optimal"].astype(bool).tolist()
    with_latency = bool(frame["int8_ms"].notna().all())
    title = "Runs: metric against size" if has_metric else "Runs: model output SQNR against size"
    if fp32 is not None:
        title += " (FP32 metric dashed)"
    parts = [f'<text x="{LEFT}" y="18" class="jp-WorkbenchReport-chartTitle">{esc(title)}</text>']
    bottom = TOP + plot_h
    parts.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{bottom}" y2="{bottom}"/>')
    parts.append(f'<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{bottom}"/>')
    for tick in nice_ticks(x_low, x_high, 5):
        at = f"{x(tick):.1f}"
        parts.append(f'<line x1="{at}" x2="{at}" y1="{bottom}" y2="{bottom + 4}"/>')
        parts.append(
            f'<text x="{x(tick):.1f}" y="{bottom + 16}" text-anchor="middle">'
            f"{esc(significant(tick))}</text>"
        )
    for tick in nice_ticks(y_low, y_high, 4):
        parts.append(f'<line x1="{LEFT - 4}" x2="{LEFT}" y1="{y(tick):.1f}" y2="{y(tick):.1f}"/>')
        parts.append(
            f'<text x="{LEFT - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">'
            f"{esc(significant(tick))}</text>"
        )
    parts += _axis_names(plot_w, plot_h, has_metric)
    if fp32 is not None:
        parts.append(
            f'<line class="jp-WorkbenchReport-fp32Line" x1="{LEFT}" x2="{LEFT + plot_w}" '
            f'y1="{y(fp32):.1f}" y2="{y(fp32):.1f}"/>'
        )
    if not with_latency:  # in two dimensions the optimal runs form a frontier
        front = sorted((s, v) for s, v, o in zip(sizes, values, optimal, strict=True) if o)
        if len(front) > 1:
            points = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in front)
            parts.append(f'<polyline class="jp-WorkbenchReport-frontier" points="{points}"/>')
    for run, size, value, best in zip(frame["run"], sizes, values, optimal, strict=True):
        cls = "jp-mod-optimal" if best else "jp-mod-dominated"
        shown = significant(value, 4) if math.isfinite(value) else "exact"
        parts.append(
            f'<circle class="jp-WorkbenchReport-runPoint {cls}" cx="{x(size):.1f}" '
            f'cy="{y(value):.1f}" r="5"><title>run {run}: {esc(significant(size))} KiB, '
            f"{esc(shown)}</title></circle>"
        )
        anchor = "end" if x(size) > LEFT + plot_w - 30 else "start"
        dx = -8 if anchor == "end" else 8
        parts.append(
            f'<text class="jp-WorkbenchReport-runLabel" x="{x(size) + dx:.1f}" '
            f'y="{y(value) - 7:.1f}" text-anchor="{anchor}">#{run}</text>'
        )
    legend = "red: Pareto-optimal" + (" (metric, size, latency)" if with_latency else "")
    legend += "; grey: dominated"
    parts.append(f'<text x="{LEFT + plot_w}" y="18" text-anchor="end">{esc(legend)}</text>')
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" aria-label="{esc(title)}">' + "".join(parts) + "</svg>"
    )
    return f'<div class="jp-WorkbenchReport-chart jp-WorkbenchReport-runsChart">{svg}</div>'
