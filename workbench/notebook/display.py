"""Display glue of the notebook front ends: one-line errors, styled tables, SVG figures.

Reports and results display themselves (``Report._repr_mimebundle_``: text/plain, escaped
text/html and ``application/vnd.workbench.report+json``); this module formats what the panel
shows around them. Every text that comes from a model or a user (layer names, messages) is
HTML-escaped.
"""

from __future__ import annotations

import html
import io

import pandas as pd

from workbench.analysis.html.format import significant
from workbench.analysis.html.view import frame_html, stylesheet
from workbench.errors import WorkbenchError, first_line

__all__ = ["error_line", "figure_svg", "significant", "status_html", "table_html", "text_html"]

MAX_ERROR_CHARS = 300
# theme variables (report_view.css sets them per JupyterLab theme), light fallbacks
STATUS_COLORS = {
    "info": "var(--jp-ui-font-color1, rgba(0, 0, 0, 0.87))",
    "ok": "var(--wb-status-ok, #1b5e20)",
    "error": "var(--wb-status-error, #b71c1c)",
}


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
    return f"<span class='jp-WorkbenchStatus' style='color:{color}'>{html.escape(text)}</span>"


def table_html(frame: pd.DataFrame, headers: dict[str, str] | None = None) -> str:
    """A DataFrame in the report view's table style: escaped text (a layer named
    ``<img ...>`` shows as text), friendly headers, numbers positional with at most 3
    decimals, an em dash for a missing value."""
    return styled(frame_html(frame, headers))


def text_html(text: str) -> str:
    """Lines of text (a benchmark's summary), escaped, in the report view's font."""
    lines = "<br>".join(html.escape(line) for line in text.splitlines())
    return styled(f"<div class='jp-WorkbenchReport-note'>{lines}</div>")


def styled(inner: str) -> str:
    """``inner`` inside the report view's container, with its stylesheet (front ends without
    the JupyterLab extension have no other copy of it)."""
    return f"<style>{stylesheet()}</style><div class='jp-WorkbenchReport'>{inner}</div>"


def figure_svg(figure) -> bytes:
    """A matplotlib figure as SVG bytes (for an ``ipywidgets.Image`` of format svg+xml:
    sharp at any zoom, the background kept transparent for dark themes)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="svg", transparent=True)
    return buffer.getvalue()
