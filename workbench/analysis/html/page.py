"""The standalone HTML file of a report (``Report.to_html``), the file people share.

One self-contained page: the report view's CSS inline, the chart as inline SVG, no network.
It names the model, the date and the versions of torch, onnxruntime and the workbench, turns
dark with ``prefers-color-scheme: dark``, and carries a small script for the table (sort,
filter, hide FP32 / folded, worst first) and the chart (click a bar to filter the table).
"""

from __future__ import annotations

import datetime
import html
from importlib import metadata
from typing import Any

from workbench._version import __version__
from workbench.analysis.html.view import report_view_html, stylesheet

DARK_PALETTE = """
:root { color-scheme: light dark; }
body { margin: 16px 24px; background: #fff; }
@media (prefers-color-scheme: dark) {
  body {
    background: #111;
    --jp-layout-color1: #111; --jp-layout-color2: #2a2a2a; --jp-layout-color4: #616161;
    --jp-ui-font-color1: rgba(255, 255, 255, 0.87); --jp-ui-font-color2: rgba(255, 255, 255, 0.6);
    --jp-border-color1: #616161; --jp-border-color2: #424242; --jp-brand-color1: #64b5f6;
  }
}
"""

# Reads the cells' data-sort / text, the rows' data-status / data-layer (report_html.py);
# the "Columns" chooser shows / hides the cells of a column.
SCRIPT = """
document.querySelectorAll('.jp-WorkbenchReport').forEach(function (root) {
  var layers = root.querySelector('.jp-WorkbenchReport-layers');
  if (!layers) { return; }
  var tbody = layers.querySelector('tbody');
  var rows = Array.prototype.slice.call(tbody.rows);
  var filter = layers.querySelector('.jp-WorkbenchReport-filter');
  var hide = layers.querySelector('.jp-WorkbenchReport-hideFp32');
  var count = layers.querySelector('.jp-WorkbenchReport-count');
  var sortColumn = null, ascending = true;
  function key(row) {
    var cell = row.querySelector('td[data-column="' + sortColumn + '"]');
    var value = cell.getAttribute('data-sort');
    return value === null ? null : (isNaN(Number(value)) ? value : Number(value));
  }
  function textKey(row) {
    return row.querySelector('td[data-column="' + sortColumn + '"]').textContent;
  }
  function update() {
    var needle = filter.value.trim().toLowerCase(), shown = 0;
    var ordered = rows.slice();
    if (sortColumn) {
      var numeric = rows.some(function (r) { return key(r) !== null; });
      ordered.sort(function (a, b) {
        var va = numeric ? key(a) : textKey(a), vb = numeric ? key(b) : textKey(b);
        if (va === null || vb === null) {
          return va === vb ? a.dataset.index - b.dataset.index : (va === null ? 1 : -1);
        }
        var c = numeric ? va - vb :
          String(va).localeCompare(String(vb), undefined, {numeric: true});
        return (ascending ? c : -c) || a.dataset.index - b.dataset.index;
      });
    }
    ordered.forEach(function (row) {
      var visible = (!needle || row.dataset.layer.toLowerCase().indexOf(needle) >= 0) &&
        !(hide.checked && row.dataset.status !== 'quantized');
      row.style.display = visible ? '' : 'none';
      shown += visible ? 1 : 0;
      tbody.appendChild(row);
    });
    layers.querySelectorAll('th').forEach(function (th) {
      var active = th.dataset.column === sortColumn;
      th.setAttribute('aria-sort', active ? (ascending ? 'ascending' : 'descending') : 'none');
    });
    count.textContent = shown + ' of ' + rows.length + ' layers';
  }
  layers.querySelectorAll('th').forEach(function (th) {
    th.addEventListener('click', function () {
      ascending = sortColumn === th.dataset.column ? !ascending : true;
      sortColumn = th.dataset.column;
      update();
    });
  });
  layers.querySelector('.jp-WorkbenchReport-worstFirst').addEventListener('click', function () {
    sortColumn = 'output_sqnr_db'; ascending = true; update();
  });
  layers.querySelectorAll('.jp-WorkbenchReport-columns input').forEach(function (box) {
    box.addEventListener('change', function () {
      var selector = '[data-column="' + box.dataset.column + '"]';
      layers.querySelectorAll('th' + selector + ', td' + selector).forEach(function (cell) {
        cell.hidden = !box.checked;
      });
    });
  });
  filter.addEventListener('input', update);
  hide.addEventListener('change', update);
  root.querySelectorAll('.jp-WorkbenchReport-sqnrBar').forEach(function (bar) {
    bar.addEventListener('click', function () {
      var name = bar.getAttribute('data-layer');
      filter.value = filter.value === name ? '' : name;
      update();
      layers.scrollIntoView({block: 'nearest'});
    });
  });
});
"""


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def page_meta(model_name: str | None, now: datetime.datetime | None = None) -> list[str]:
    """Model name, date and versions, one item each."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    items = [f"model {model_name}"] if model_name else []
    items.append(now.strftime("%Y-%m-%d %H:%M UTC"))
    import torch

    items.append(
        f"torch {torch.__version__}, onnxruntime {_version('onnxruntime')}, workbench {__version__}"
    )
    return items


def report_page(bundle: dict[str, Any], model_name: str | None) -> str:
    """The whole standalone page."""
    title = "Quantization report" + (f": {model_name}" if model_name else "")
    view = report_view_html(bundle, meta=page_meta(model_name), interactive=True, with_style=False)
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(title)}</title>"
        f"<style>{stylesheet()}{DARK_PALETTE}</style></head>"
        f"<body>{view}<script>{SCRIPT}</script></body></html>"
    )
