"""Strip from executed notebooks what must not be committed, in place.

Removes the saved ipywidgets state (notebook metadata ``widgets``) and the widget views that
point into it (tqdm progress bars, the panel), the report's JSON bundle (the JupyterLab
extension renders it when the notebook runs; the committed ``text/html`` fallback shows the
same tables), the HTML of every report after a notebook's first (their ``text/plain`` summary
stays) and execution timestamps. ``tests/unit/test_notebook_files.py`` fails when a
committed notebook still carries any of them or grows past its line budget.

    jupyter nbconvert --to notebook --execute --inplace notebooks/0*.ipynb
    python notebooks/clean_notebooks.py notebooks/0*.ipynb
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
REPORT_BUNDLE = "application/vnd.workbench.report+json"
UNCOMMITTED_MIME_TYPES = (WIDGET_VIEW, REPORT_BUNDLE)


def clean_notebook(notebook: dict) -> dict:
    """The notebook without widget state, widget views, report bundles and timestamps."""
    notebook["metadata"].pop("widgets", None)
    reports_seen = 0
    for cell in notebook["cells"]:
        cell.get("metadata", {}).pop("execution", None)
        if cell["cell_type"] != "code":
            continue
        outputs = []
        for output in cell.get("outputs", []):
            data = output.get("data")
            if data is not None:
                if WIDGET_VIEW in data:
                    continue  # a view of state that is not saved: nothing to show
                if REPORT_BUNDLE in data:
                    reports_seen += 1
                    if reports_seen > 1:
                        data.pop("text/html", None)
                for mime_type in UNCOMMITTED_MIME_TYPES:
                    data.pop(mime_type, None)
            outputs.append(output)
        cell["outputs"] = outputs
    return notebook


def main(paths: list[str]) -> None:
    for path in map(Path, paths):
        notebook = clean_notebook(json.loads(path.read_text()))
        path.write_text(json.dumps(notebook, indent=1, sort_keys=True, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
