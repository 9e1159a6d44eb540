/**
 * Storage per layer as bars: FP32 bytes against what the quantized layer stores, split into
 * weights, scales, zero points and bias. Bars share one scale (the largest FP32 layer), so
 * lengths compare across layers; the TOTAL row has its own.
 */

import { append, element } from './dom';
import { formatBytes } from './format';
import { isTotalRow, IStorageRow } from './report';

const PARTS: { key: keyof IStorageRow; label: string; className: string }[] = [
  { key: 'weight_bytes', label: 'weights', className: 'jp-WorkbenchReport-weights' },
  { key: 'scale_bytes', label: 'scales', className: 'jp-WorkbenchReport-scales' },
  { key: 'zero_point_bytes', label: 'zero points', className: 'jp-WorkbenchReport-zeroPoints' },
  { key: 'bias_bytes', label: 'bias', className: 'jp-WorkbenchReport-bias' }
];

function percent(part: number, whole: number): string {
  return whole > 0 ? `${Math.max(0, (100 * part) / whole)}%` : '0%';
}

function bar(className: string, widthPercent: string, title: string): HTMLElement {
  const node = element('div', `jp-WorkbenchReport-bar ${className}`);
  node.style.width = widthPercent;
  node.title = title;
  return node;
}

function renderStorageRow(row: IStorageRow, scaleBytes: number): HTMLElement {
  const total = isTotalRow(row);
  const node = element('div', 'jp-WorkbenchReport-storageRow');
  node.dataset.status = row.status || 'total';
  if (total) {
    node.classList.add('jp-WorkbenchReport-storageTotal');
  }
  if (row.status === 'fp32') {
    node.classList.add('jp-WorkbenchReport-fp32');
  }

  const name = element('div', 'jp-WorkbenchReport-storageName');
  name.appendChild(element('code', 'jp-WorkbenchReport-layerName', total ? 'total' : row.layer));
  if (row.status === 'fp32') {
    const folded = row.total_bytes === 0 && row.fp32_bytes > 0;
    name.appendChild(
      element(
        'span',
        `jp-WorkbenchReport-badge${folded ? ' jp-mod-folded' : ''}`,
        folded ? 'folded' : 'FP32'
      )
    );
  }

  const bars = element('div', 'jp-WorkbenchReport-bars');
  const fp32Track = element('div', 'jp-WorkbenchReport-track');
  fp32Track.appendChild(
    bar(
      'jp-WorkbenchReport-fp32Bar',
      percent(row.fp32_bytes, scaleBytes),
      `FP32: ${formatBytes(row.fp32_bytes)}`
    )
  );
  const quantTrack = element('div', 'jp-WorkbenchReport-track');
  for (const part of PARTS) {
    const bytes = row[part.key] as number;
    if (bytes > 0) {
      quantTrack.appendChild(
        bar(part.className, percent(bytes, scaleBytes), `${part.label}: ${formatBytes(bytes)}`)
      );
    }
  }
  append(bars, fp32Track, quantTrack);

  const ratio = row.total_bytes > 0 ? `${(row.fp32_bytes / row.total_bytes).toFixed(2)}\u00d7` : '';
  const numbers = element(
    'div',
    'jp-WorkbenchReport-storageNumbers',
    `${formatBytes(row.fp32_bytes)} \u2192 ${formatBytes(row.total_bytes)}${ratio ? ` (${ratio})` : ''}`
  );
  append(node, name, bars, numbers);
  return node;
}

function renderStorageLegend(): HTMLElement {
  const legend = element('div', 'jp-WorkbenchReport-storageLegend');
  const item = (className: string, label: string) => {
    const node = element('span', 'jp-WorkbenchReport-legendItem');
    append(node, element('span', `jp-WorkbenchReport-legendSwatch ${className}`), element('span', undefined, label));
    return node;
  };
  legend.appendChild(item('jp-WorkbenchReport-fp32Bar', 'FP32 (upper bar)'));
  for (const part of PARTS) {
    legend.appendChild(item(part.className, part.label));
  }
  return legend;
}

export function renderStorage(rows: IStorageRow[]): HTMLElement {
  const root = element('div', 'jp-WorkbenchReport-storage');
  root.appendChild(renderStorageLegend());
  const layers = rows.filter(row => !isTotalRow(row));
  const largest = Math.max(0, ...layers.map(row => Math.max(row.fp32_bytes, row.total_bytes)));
  for (const row of layers) {
    root.appendChild(renderStorageRow(row, largest));
  }
  for (const row of rows.filter(isTotalRow)) {
    root.appendChild(renderStorageRow(row, Math.max(row.fp32_bytes, row.total_bytes)));
  }
  return root;
}
