"""Bar chart of a sensitivity table: what each layer costs, as a drop from FP32."""

from __future__ import annotations

import pandas as pd


def sensitivity_chart(table: pd.DataFrame):
    """Per layer, the metric's drop from FP32 with only that layer quantized and with all
    but that one (differences, not absolute values: on a 0-100 axis they would not show)."""
    import matplotlib.pyplot as plt

    from workbench.analysis.plots import themed

    metric = table.attrs.get("metric", "metric")
    baseline = table.attrs.get("metric_fp32")
    only = table["drop_only_this"].astype(float)
    all_but = (
        float(baseline) - table["metric_all_but_this_quantized"].astype(float)
        if baseline is not None
        else table["metric_all_but_this_quantized"].astype(float)
    )
    x = range(len(table))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(table) + 2), 3.6))
    ax.bar(
        [i - 0.2 for i in x], only, width=0.4, color="#d62728", label="only this layer quantized"
    )
    ax.bar([i + 0.2 for i in x], all_but, width=0.4, color="#1f77b4", label="all but this layer")
    ax.axhline(0.0, color="#888888", lw=0.8)
    ax.set_xticks(list(x))
    ax.set_xticklabels(table["layer"], rotation=75, ha="right", fontsize=7)
    unit = " (dB)" if metric == "output_sqnr_db" else ""
    ax.set_ylabel(f"drop from FP32{unit}" if baseline is not None else metric)
    ax.set_title(f"Layer sensitivity: {metric} lost, most sensitive first")
    ax.legend(fontsize=7)
    themed(fig, ax)
    fig.tight_layout()
    plt.close(fig)
    return fig
