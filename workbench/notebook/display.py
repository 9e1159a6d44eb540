"""Display glue of the notebook front ends: one-line errors, escaped HTML tables, PNG figures.

Reports and results display themselves (``Report._repr_mimebundle_``: text/plain, escaped
text/html and ``application/vnd.workbench.report+json``); this module formats what the panel
shows around them. Every text that comes from a model or a user (layer names, messages) is
HTML-escaped.
"""

from __future__ import annotations

import html
import io

import pandas as pd

from workbench.errors import WorkbenchError, first_line

MAX_ERROR_CHARS = 300
STATUS_COLORS = {"info": "#555555", "ok": "#2c7a2c", "error": "#c62828"}


def error_line(exc: BaseException) -> str:
    """One line that says what went wrong: the message of the workbench's own errors, the
    type and first line of the message for anything else."""
    first = first_line(exc)
    from IPython.core.error import UsageError

    if not isinstance(exc, WorkbenchError | UsageError) and str(exc).strip():
        first = f"{type(exc).__name__}: {first}"
    if len(first) > MAX_ERROR_CHARS:
        first = first[: MAX_ERROR_CHARS - 3] + "..."
    return first


def status_html(text: str, kind: str = "info") -> str:
    """A one-line status message, escaped and coloured by ``kind`` (info, ok, error)."""
    color = STATUS_COLORS[kind]
    return f"<span style='color:{color}'>{html.escape(text)}</span>"


def table_html(frame: pd.DataFrame) -> str:
    """A DataFrame as an escaped HTML table (a layer named ``<img ...>`` shows as text)."""
    return frame.to_html(index=False, escape=True, float_format="{:.4g}".format, na_rep="")


def summary_html(summary_text: str) -> str:
    """The report's summary lines, escaped, one per line."""
    lines = "<br>".join(html.escape(line) for line in summary_text.splitlines())
    return f"<div style='font-family:monospace'>{lines}</div>"


def figure_png(figure) -> bytes:
    """A matplotlib figure as PNG bytes (for an ``ipywidgets.Image``; no pyplot state)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()
