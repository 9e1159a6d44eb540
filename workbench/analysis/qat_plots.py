"""Figures of a QAT run: loss and metric per epoch, learned scales per step.

They read ``result.history`` (one row per training step: ``step``, ``epoch``, ``loss``,
``metric`` at the end of each evaluated epoch, ``weight_scale[layer]`` and
``act_scale[input of layer]`` / ``act_scale[output of module]`` when scales are learned).
matplotlib is imported only when a figure is asked for.
"""

from __future__ import annotations

import pandas as pd

SCALE_PREFIXES = ("weight_scale[", "act_scale[")
MAX_LEGEND_ENTRIES = 12


def _pyplot():
    import matplotlib.pyplot as plt

    return plt


def scale_columns(history: pd.DataFrame) -> list[str]:
    """The history's learned-scale columns."""
    return [c for c in history.columns if c.startswith(SCALE_PREFIXES)]


def epoch_table(history: pd.DataFrame) -> pd.DataFrame:
    """One row per epoch: steps, mean loss, last loss, metric (NaN when not evaluated)."""
    if history.empty:
        return pd.DataFrame(columns=["epoch", "steps", "mean_loss", "last_loss", "metric"])
    metric = history["metric"] if "metric" in history else pd.Series(float("nan"), history.index)
    grouped = history.assign(metric=metric).groupby("epoch", sort=True)
    return pd.DataFrame(
        {
            "epoch": grouped["step"].count().index.astype(int),
            "steps": grouped["step"].count().to_numpy(),
            "mean_loss": grouped["loss"].mean().to_numpy(),
            "last_loss": grouped["loss"].last().to_numpy(),
            "metric": grouped["metric"].last().to_numpy(),
        }
    )


def training_curves(history: pd.DataFrame):
    """Loss per step with its mean per epoch (left) and the eval metric per epoch (right)."""
    plt = _pyplot()
    has_metric = "metric" in history and history["metric"].notna().any()
    fig, axes = plt.subplots(1, 2 if has_metric else 1, figsize=(10 if has_metric else 6, 3.4))
    loss_ax = axes[0] if has_metric else axes
    loss_ax.plot(history["step"], history["loss"], color="#9ecae1", lw=0.8, label="per step")
    epochs = epoch_table(history)
    last_steps = history.groupby("epoch")["step"].max().to_numpy()
    loss_ax.plot(last_steps, epochs["mean_loss"], "o-", color="#08519c", label="epoch mean")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss")
    loss_ax.set_title("QAT training loss")
    loss_ax.legend(fontsize=7)
    if has_metric:
        evaluated = epochs[epochs["metric"].notna()]
        axes[1].plot(evaluated["epoch"], evaluated["metric"], "o-", color="#2ca02c")
        axes[1].set_xlabel("epoch")
        axes[1].set_ylabel("eval metric")
        axes[1].set_xticks(list(evaluated["epoch"]))
        axes[1].set_title("Eval metric per epoch (fake-quantized model)")
    fig.tight_layout()
    plt.close(fig)
    return fig


def scale_trajectories(history: pd.DataFrame):
    """Each learned scale relative to its value after the first step (per-channel weight
    scales as their mean), so layers of very different ranges share one axis."""
    columns = scale_columns(history)
    if not columns:
        raise ValueError("no scale was learned in this run; pass learn_scales=True to wb.qat")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for column in columns:
        values = history[column].astype(float)
        first = values.iloc[0]
        relative = values / first if first else values
        style = "-" if column.startswith("weight") else "--"
        ax.plot(history["step"], relative, style, lw=1.0, label=column)
    ax.axhline(1.0, color="#999999", lw=0.5)
    ax.set_xlabel("step")
    ax.set_ylabel("scale / scale at step 1")
    ax.set_title("Learned scales (solid: weights, dashed: activations)")
    if len(columns) <= MAX_LEGEND_ENTRIES:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    plt.close(fig)
    return fig
