/**
 * The per-layer output SQNR chart: one bar per layer in model order on the poor / fair /
 * good bands (the same SVG as workbench/analysis/html/view.py draws). Clicking a bar
 * calls ``onSelect`` with the layer's name (the report filters its table to it).
 */

import { formatDb, isNumber, SQNR_GOOD_DB, SQNR_POOR_DB, sqnrBand } from './format';
import { ILayerRow } from './report';

const SVG_NS = 'http://www.w3.org/2000/svg';
const HEIGHT = 190;
const TOP_DB = 50;

function svg<K extends keyof SVGElementTagNameMap>(
  tag: K,
  attrs: Record<string, string | number>,
  cls?: string
): SVGElementTagNameMap[K] {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) {
    node.setAttribute(key, String(value));
  }
  if (cls) {
    node.setAttribute('class', cls);
  }
  return node;
}

function text(x: number, y: number, content: string, anchor = 'start'): SVGTextElement {
  const node = svg('text', { x, y, 'text-anchor': anchor });
  node.textContent = content;
  return node;
}

export function renderSqnrChart(
  layers: ILayerRow[],
  onSelect: (layer: string) => void
): HTMLElement {
  const root = document.createElement('div');
  root.className = 'jp-WorkbenchReport-chart';
  const [left, right, top, bottom] = [44, 8, 8, 22];
  // 100 layers fit a 1400 px window with the sidebar open
  const step = layers.length <= 60 ? 14 : layers.length <= 110 ? 8 : 6;
  const plotW = Math.max(400, step * layers.length);
  const width = left + plotW + right;
  const plotH = HEIGHT - top - bottom;
  const measured = layers.map(row => row.output_sqnr_db).filter(isNumber);
  const topDb = 10 * Math.ceil(Math.max(TOP_DB, ...measured) / 10);
  const y = (db: number) => top + plotH * (1 - Math.min(Math.max(db, 0), topDb) / topDb);

  const chart = svg('svg', {
    viewBox: `0 0 ${width} ${HEIGHT}`,
    width,
    height: HEIGHT,
    role: 'img',
    'aria-label': 'Output SQNR per layer'
  });
  const bands: [string, number, number][] = [
    ['poor', 0, SQNR_POOR_DB],
    ['fair', SQNR_POOR_DB, SQNR_GOOD_DB],
    ['good', SQNR_GOOD_DB, topDb]
  ];
  for (const [band, low, high] of bands) {
    chart.appendChild(
      svg(
        'rect',
        { x: left, y: y(high), width: plotW, height: y(low) - y(high) },
        `jp-WorkbenchReport-band jp-mod-${band}`
      )
    );
  }
  for (let db = 0; db <= topDb; db += 10) {
    chart.appendChild(svg('line', { x1: left - 4, x2: left, y1: y(db), y2: y(db) }));
    chart.appendChild(text(left - 6, y(db) + 4, String(db), 'end'));
  }
  const label = text(12, top + plotH / 2, 'dB', 'middle');
  label.setAttribute('transform', `rotate(-90 12 ${top + plotH / 2})`);
  chart.appendChild(label);

  const barW = Math.max(2, step - 3);
  layers.forEach((row, index) => {
    const value = row.output_sqnr_db;
    const x = left + index * step + (step - barW) / 2;
    let band: string;
    let height: number;
    let title: string;
    if (row.status !== 'quantized' && row.folded_into) {
      [band, height, title] = ['fp32', 4, `${row.layer}: folded into ${row.folded_into}`];
    } else if (row.status !== 'quantized') {
      [band, height, title] = ['fp32', 4, `${row.layer}: kept FP32`];
    } else if (isNumber(value)) {
      [band, height, title] = [sqnrBand(value), y(0) - y(value), `${row.layer}: output SQNR ${formatDb(value)}`];
    } else {
      [band, height, title] = ['good', y(0) - y(topDb), `${row.layer}: output SQNR exact or not measured`];
    }
    const bar = svg(
      'rect',
      { x, y: y(0) - height, width: barW, height: Math.max(height, 1) },
      `jp-WorkbenchReport-sqnrBar jp-mod-${band}`
    );
    bar.dataset.layer = row.layer;
    const tip = svg('title', {});
    tip.textContent = title;
    bar.appendChild(tip);
    bar.addEventListener('click', () => {
      // the selected bar clicked again clears the filter
      const again = bar.classList.contains('jp-mod-selected');
      for (const other of Array.from(chart.querySelectorAll('.jp-mod-selected'))) {
        other.classList.remove('jp-mod-selected');
      }
      if (!again) {
        bar.classList.add('jp-mod-selected');
      }
      onSelect(again ? '' : row.layer);
    });
    chart.appendChild(bar);
  });
  chart.appendChild(svg('line', { x1: left, x2: left + plotW, y1: y(0), y2: y(0) }));
  chart.appendChild(
    text(
      left,
      HEIGHT - 6,
      `layers in model order (${layers.length}); bands: poor < ${SQNR_POOR_DB} dB \u2264 ` +
        `fair < ${SQNR_GOOD_DB} dB \u2264 good; grey: kept FP32 or folded; click a bar to filter the table (again to clear)`
    )
  );
  root.appendChild(chart);
  return root;
}
