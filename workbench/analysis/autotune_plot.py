"""The autotune chart: each exported candidate's metric against its objective (ONNX Runtime
p50 latency, or file size), the max_drop line, the candidates within it filled, the
best one marked, and the Pareto frontier of the ones within max_drop."""

from __future__ import annotations

import pandas as pd


def autotune_chart(table: pd.DataFrame, metric_fp32: float, max_drop: float, objective: str):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    column = "latency_ms" if objective == "latency" else "file_bytes"
    measured = table[table[column].notna() & table["metric"].notna()]
    x = measured[column].astype(float)
    if objective == "size":
        x = x / 1024
    y = measured["metric"].astype(float)
    meets = measured["meets_max_drop"].eq(True).to_numpy()
    ax.scatter(
        x[~meets], y[~meets], facecolors="none", edgecolors="#999999", label="misses max_drop"
    )
    ax.scatter(x[meets], y[meets], color="#1f77b4", label="within max_drop")
    within = measured[meets].assign(_x=x[meets]).sort_values("_x")
    frontier, best_metric = [], -float("inf")
    for _, row in within.iterrows():  # faster and better than every faster one
        if float(row["metric"]) > best_metric:
            frontier.append(row)
            best_metric = float(row["metric"])
    if frontier:
        ax.step(
            [r["_x"] for r in frontier],
            [r["metric"] for r in frontier],
            where="post",
            color="#1f77b4",
            lw=1,
        )
    best = measured[measured["status"] == "best"]
    if not best.empty:
        ax.scatter(
            x[best.index], y[best.index], marker="*", s=180, color="#d62728", label="best", zorder=3
        )
        ax.annotate(
            str(best.iloc[0]["candidate"]), (x[best.index[0]], y[best.index[0]]), fontsize=7
        )
    ax.axhline(metric_fp32 - max_drop, color="#d62728", lw=0.8, ls="--", label="FP32 - max_drop")
    ax.set_xlabel("ONNX Runtime latency p50 (ms)" if objective == "latency" else "file size (KiB)")
    ax.set_ylabel("metric")
    ax.set_title(f"Autotune: {len(measured)} exported candidates")
    ax.legend(fontsize=7)
    fig.tight_layout()
    plt.close(fig)
    return fig
