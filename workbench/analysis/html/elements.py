"""Small HTML builders of the report views: escaping, one element, names shortened in the
middle, the shared stylesheet. Every model-supplied string goes through ``esc``."""

from __future__ import annotations

import html
from importlib import resources
from typing import Any

NAME_CHARS = 40


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def stylesheet() -> str:
    """The report view's CSS (shared with the JupyterLab extension)."""
    return resources.files("workbench.analysis.html").joinpath("report_view.css").read_text()


def shorten_middle(name: str, max_chars: int = NAME_CHARS) -> str:
    """``feature_extractor.stages.3.0.second_convolution`` -> ``feature_e…3.0.second_convolution``:
    the start and, longer, the end of a long name stay (the block numbers and the leaf tell
    siblings apart)."""
    if len(name) <= max_chars:
        return name
    head = max(7, max_chars // 4)
    tail = max_chars - 1 - head
    return f"{name[:head]}\u2026{name[-tail:]}"


def element(tag: str, cls: str | None = None, text: str | None = None, **attrs: Any) -> str:
    parts = [tag]
    if cls:
        parts.append(f'class="{esc(cls)}"')
    for key, value in attrs.items():
        if value is not None:
            parts.append(f'{key.rstrip("_").replace("_", "-")}="{esc(value)}"')
    body = esc(text) if text is not None else ""
    return f"<{' '.join(parts)}>{body}</{tag}>"
