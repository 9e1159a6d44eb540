/**
 * Storage bars: each layer on its own scale (its FP32 size is the full width), so small
 * layers and the scale / zero point / bias pieces stay visible; long names shortened in the
 * middle with the full name on hover; the legend lists only the pieces present.
 */

import { append, element } from './dom';
import { formatBytes, formatRatio, shortenMiddle } from './format';
import { isTotalRow, IStorageRow } from './report';

const PARTS: { key: keyof IStorageRow; label: string; className: string }[] = [
  { key: 'weight_bytes', label: 'weights', className: 'jp-WorkbenchReport-weights' },
  { key: 'scale_bytes', label: 'scales', className: 'jp-WorkbenchReport-scales' },
  { key: 'zero_point_bytes', label: 'zero points', className: 'jp-WorkbenchReport-zeroPoints' },
  { key: 'bias_bytes', label: 'bias', className: 'jp-WorkbenchReport-bias' }
];

function bar(className: string, part: number, whole: number, title: string): HTMLElement {
  const node = element('div', `jp-WorkbenchReport-bar ${className}`);
  node.style.width = whole > 0 ? `${((100 * part) / whole).toFixed(2)}%` : '0%';
  node.title = title;
  return node;
}

function isFoldedRow(row: IStorageRow): boolean {
  return row.status === 'fp32' && row.total_bytes === 0 && row.fp32_bytes > 0;
}

function renderStorageRow(row: IStorageRow): HTMLElement {
  const total = isTotalRow(row);
  const name = total ? 'total' : row.layer;
  const node = element('div', 'jp-WorkbenchReport-storageRow');
  node.dataset.layer = name;
  node.dataset.status = row.status || 'total';
  if (total) {
    node.classList.add('jp-WorkbenchReport-storageTotal');
  }
  const label = element('div', 'jp-WorkbenchReport-storageName');
  const code = element('code', 'jp-WorkbenchReport-layerName', shortenMiddle(name));
  code.title = name;
  label.appendChild(code);
  const folded = isFoldedRow(row);
  if (row.status === 'fp32') {
    label.appendChild(
      element('span', `jp-WorkbenchReport-badge${folded ? ' jp-mod-folded' : ''}`, folded ? 'folded' : 'FP32')
    );
  }
  const whole = Math.max(row.fp32_bytes, row.total_bytes);
  const bars = element('div', 'jp-WorkbenchReport-bars');
  const fp32Track = element('div', 'jp-WorkbenchReport-track');
  fp32Track.appendChild(
    bar('jp-WorkbenchReport-fp32Bar', row.fp32_bytes, whole, `FP32: ${formatBytes(row.fp32_bytes)}`)
  );
  const quantTrack = element('div', 'jp-WorkbenchReport-track');
  if (row.status === 'fp32' && !folded) {
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
    `${formatBytes(row.fp32_bytes)} \u2192 ${formatBytes(row.total_bytes)}${ratio}`
  );
  append(node, label, bars, numbers);
  return node;
}

function renderStorageLegend(layers: IStorageRow[]): HTMLElement {
  const legend = element('div', 'jp-WorkbenchReport-storageLegend');
  const item = (className: string, label: string) => {
    const node = element('span', 'jp-WorkbenchReport-legendItem');
    append(node, element('span', `jp-WorkbenchReport-legendSwatch ${className}`), element('span', undefined, label));
    return node;
  };
  legend.appendChild(item('jp-WorkbenchReport-fp32Bar', 'FP32 (upper bar, full width)'));
  for (const part of PARTS) {
    if (layers.some(row => row.status === 'quantized' && (row[part.key] as number) > 0)) {
      legend.appendChild(item(part.className, part.label));
    }
  }
  if (layers.some(row => row.status === 'fp32' && row.total_bytes > 0)) {
    legend.appendChild(item('jp-WorkbenchReport-fp32Kept', 'kept FP32'));
  }
  return legend;
}

export function renderStorage(rows: IStorageRow[]): HTMLElement {
  const root = element('div', 'jp-WorkbenchReport-storage');
  const layers = rows.filter(row => !isTotalRow(row));
  root.appendChild(renderStorageLegend(layers));
  const list = element('div', 'jp-WorkbenchReport-storageRows');
  for (const row of layers) {
    list.appendChild(renderStorageRow(row));
  }
  root.appendChild(list);
  for (const row of rows.filter(isTotalRow)) {
    root.appendChild(renderStorageRow(row));
  }
  return root;
}
