"""The report of a QAT run: PTQ's tables and plots, plus the training history and its figures."""

from __future__ import annotations

from typing import Any

import pandas as pd

from workbench.analysis.qat_plots import epoch_table
from workbench.analysis.report import Report


class QATReport(Report):
    """A :class:`Report` with the training history of ``wb.qat``.

    Attributes
    ----------
    history : pandas.DataFrame
        One row per training step (``step``, ``epoch``, ``loss``, ``metric`` at evaluated epoch
        ends, learned scales), the same table as ``result.history``.
    epochs : pandas.DataFrame
        One row per epoch (``steps``, ``mean_loss``, ``last_loss``, ``metric``); also shown in
        the HTML report.
    """

    def __init__(self, base: Report, history: pd.DataFrame, training: dict[str, Any]) -> None:
        self.history = history
        self.epochs = epoch_table(history)
        summary = dict(base.summary) | training
        extra = dict(base.extra_tables) | {"Training (per epoch)": self.epochs}
        super().__init__(base.layers, base.storage, summary, base._model, extra)

    def plot_training(self):
        """Loss per step / epoch and the eval metric per epoch."""
        from workbench.analysis.qat_plots import training_curves

        return training_curves(self.history)

    def plot_scales(self):
        """Trajectories of the learned scales (``learn_scales=True``)."""
        from workbench.analysis.qat_plots import scale_trajectories

        return scale_trajectories(self.history)

    def summary_text(self) -> str:
        s = self.summary
        line = f"  QAT: {s['qat_steps']} steps, {s['qat_epochs_completed']} epoch(s) completed"
        if s.get("qat_final_loss") is not None:
            line += f", final loss {s['qat_final_loss']:.4f}"
        if s.get("qat_interrupted"):
            line += " (interrupted)"
        return super().summary_text() + "\n" + line
