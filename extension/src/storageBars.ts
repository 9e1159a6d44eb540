/**
 * Storage bars: every layer on one linear scale (the full width is the largest layer), in
 * model order, so that sizes compare at a glance; the TOTAL row on its own scale. Folded
 * layers (a BatchNorm folded into its conv) are marked folded, not kept FP32. Long names
 * shortened in the middle with the full name on hover; the legend lists only the pieces
 * present and states the scale. The same view as workbench/analysis/html/parts.py.
 */

import { append, element } from './dom';
import { formatBytes, formatRatio, shortenMiddle } from './format';
import { ILayerRow, isTotalRow, IStorageRow } from './report';

const PARTS: { key: keyof IStorageRow; label: string; className: string }[] = [
  { key: 'weight_bytes', label: 'weights', className: 'jp-WorkbenchReport-weights' },
  { key: 'scale_bytes', label: 'scales', className: 'jp-WorkbenchReport-scales' },
  { key: 'zero_point_bytes', label: 'zero points', className: 'jp-WorkbenchReport-zeroPoints' },
  { key: 'bias_bytes', label: 'bias', className: 'jp-WorkbenchReport-bias' }
];

/** Names longer than this are shortened in the middle (room for a badge). */
const STORAGE_NAME_CHARS = 32;

function bar(className: string, part: number, whole: number, title: string): HTMLElement {
  const node = element('div', `jp-WorkbenchReport-bar ${className}`);
  node.style.width = whole > 0 ? `${((100 * part) / whole).toFixed(3)}%` : '0%';
  node.title = title;
  return node;
}

function isFoldedRow(row: IStorageRow, foldedInto: Map<string, string>): boolean {
  return (
    row.status === 'fp32' &&
    row.total_bytes === 0 &&
    (foldedInto.has(row.layer) || row.fp32_bytes > 0)
  );
}

/** The bytes the full width stands for: the largest layer's FP32 or stored size. */
export function storageScaleBytes(rows: IStorageRow[]): number {
  const layers = rows.filter(row => !isTotalRow(row));
  return Math.max(1, ...layers.map(row => Math.max(row.fp32_bytes, row.total_bytes)));
}

function renderStorageRow(
  row: IStorageRow,
  scaleBytes: number,
  foldedInto: Map<string, string>
): HTMLElement {
  const total = isTotalRow(row);
  const name = total ? 'total' : row.layer;
  const node = element('div', 'jp-WorkbenchReport-storageRow');
  node.dataset.layer = name;
  node.dataset.status = row.status || 'total';
  node.dataset.fp32Bytes = String(row.fp32_bytes);
  node.dataset.totalBytes = String(row.total_bytes);
  if (total) {
    node.classList.add('jp-WorkbenchReport-storageTotal');
  }
  const label = element('div', 'jp-WorkbenchReport-storageName');
  const code = element('code', 'jp-WorkbenchReport-layerName', shortenMiddle(name, STORAGE_NAME_CHARS));
  code.title = name;
  label.appendChild(code);
  const folded = !total && isFoldedRow(row, foldedInto);
  const target = foldedInto.get(name);
  if (folded) {
    node.classList.add('jp-WorkbenchReport-storageFolded');
    const badge = element('span', 'jp-WorkbenchReport-badge jp-mod-folded', 'folded');
    badge.title = target ? `folded into ${target}` : 'folded into the layer before it';
    label.appendChild(badge);
  } else if (row.status === 'fp32') {
    label.appendChild(element('span', 'jp-WorkbenchReport-badge', 'FP32'));
  }
  const whole = total ? Math.max(row.fp32_bytes, row.total_bytes, 1) : scaleBytes;
  const bars = element('div', 'jp-WorkbenchReport-bars');
  const fp32Track = element('div', 'jp-WorkbenchReport-track');
  fp32Track.appendChild(
    bar('jp-WorkbenchReport-fp32Bar', row.fp32_bytes, whole, `FP32: ${formatBytes(row.fp32_bytes)}`)
  );
  const quantTrack = element('div', 'jp-WorkbenchReport-track');
  if (folded) {
    const note = element('span', 'jp-WorkbenchReport-foldedNote', target ? `in ${shortenMiddle(target)}` : 'folded');
    note.title = target ? `folded into ${target}` : 'folded into the layer before it';
    quantTrack.appendChild(note);
  } else if (row.status === 'fp32') {
    quantTrack.appendChild(
      bar('jp-WorkbenchReport-fp32Kept', row.total_bytes, whole, `kept FP32: ${formatBytes(row.total_bytes)}`)
    );
  } else {
    for (const part of PARTS) {
      const bytes = row[part.key] as number;
      if (bytes > 0) {
        quantTrack.appendChild(bar(part.className, bytes, whole, `${part.label}: ${formatBytes(bytes)}`));
      }
    }
  }
  append(bars, fp32Track, quantTrack);
  const ratio = row.total_bytes > 0 ? ` (${formatRatio(row.fp32_bytes / row.total_bytes)})` : '';
  const numbers = element(
    'div',
    'jp-WorkbenchReport-storageNumbers',
    folded
      ? `${formatBytes(row.fp32_bytes)} \u2192 folded`
      : `${formatBytes(row.fp32_bytes)} \u2192 ${formatBytes(row.total_bytes)}${ratio}`
  );
  append(node, label, bars, numbers);
  return node;
}

function renderStorageLegend(layers: IStorageRow[], scaleBytes: number): HTMLElement {
  const legend = element('div', 'jp-WorkbenchReport-storageLegend');
  const item = (className: string, label: string) => {
    const node = element('span', 'jp-WorkbenchReport-legendItem');
    append(node, element('span', `jp-WorkbenchReport-legendSwatch ${className}`), element('span', undefined, label));
    return node;
  };
  legend.appendChild(item('jp-WorkbenchReport-fp32Bar', 'FP32 (upper bar)'));
  for (const part of PARTS) {
    if (layers.some(row => row.status === 'quantized' && (row[part.key] as number) > 0)) {
      legend.appendChild(item(part.className, part.label));
    }
  }
  if (layers.some(row => row.status === 'fp32' && row.total_bytes > 0)) {
    legend.appendChild(item('jp-WorkbenchReport-fp32Kept', 'kept FP32'));
  }
  legend.appendChild(
    element(
      'span',
      'jp-WorkbenchReport-storageScale',
      `one linear scale for all layers: full width = ${formatBytes(scaleBytes)} ` +
        '(the largest layer); the total on its own scale'
    )
  );
  return legend;
}

export function renderStorage(rows: IStorageRow[], layerRows: ILayerRow[] = []): HTMLElement {
  const root = element('div', 'jp-WorkbenchReport-storage');
  const foldedInto = new Map<string, string>();
  for (const row of layerRows) {
    if (row.folded_into) {
      foldedInto.set(row.layer, row.folded_into);
    }
  }
  const layers = rows.filter(row => !isTotalRow(row));
  const scaleBytes = storageScaleBytes(rows);
  root.appendChild(renderStorageLegend(layers, scaleBytes));
  const list = element('div', 'jp-WorkbenchReport-storageRows');
  for (const row of layers) {
    list.appendChild(renderStorageRow(row, scaleBytes, foldedInto));
  }
  root.appendChild(list);
  for (const row of rows.filter(isTotalRow)) {
    root.appendChild(renderStorageRow(row, scaleBytes, foldedInto));
  }
  return root;
}
