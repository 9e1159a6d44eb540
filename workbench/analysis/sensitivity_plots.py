"""Bar chart of a sensitivity table."""

from __future__ import annotations

import pandas as pd


def sensitivity_chart(table: pd.DataFrame):
    """Per layer: the metric with only that layer quantized and with all but that one."""
    import matplotlib.pyplot as plt

    x = range(len(table))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(table) + 2), 3.6))
    ax.bar(
        [i - 0.2 for i in x],
        table["metric_only_this_quantized"],
        width=0.4,
        label="only this layer quantized",
    )
    ax.bar(
        [i + 0.2 for i in x],
        table["metric_all_but_this_quantized"],
        width=0.4,
        label="all but this layer quantized",
    )
    ax.set_xticks(list(x))
    ax.set_xticklabels(table["layer"], rotation=75, ha="right", fontsize=7)
    ax.set_ylabel(table.attrs.get("metric", "metric"))
    ax.set_title("Layer sensitivity (most sensitive first)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    plt.close(fig)
    return fig
