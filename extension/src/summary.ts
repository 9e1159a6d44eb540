/** The report's summary header: sizes, compression, SQNR, metric FP32 against quantized. */

import { append, element } from './dom';
import { formatBytes, formatDb, formatNumber, isNumber, sqnrColour } from './format';
import { IReportSummary } from './report';

function card(label: string, value: string, detail?: string): HTMLElement {
  const node = element('div', 'jp-WorkbenchReport-card');
  append(
    node,
    element('div', 'jp-WorkbenchReport-cardLabel', label),
    element('div', 'jp-WorkbenchReport-cardValue', value)
  );
  if (detail) {
    node.appendChild(element('div', 'jp-WorkbenchReport-cardDetail', detail));
  }
  return node;
}

function sqnrCard(label: string, sqnrDb: number | null | undefined, detail?: string): HTMLElement {
  const node = card(label, formatDb(sqnrDb), detail);
  if (isNumber(sqnrDb)) {
    node.style.backgroundColor = sqnrColour(sqnrDb);
  }
  return node;
}

export function renderSummary(summary: IReportSummary): HTMLElement {
  const root = element('div', 'jp-WorkbenchReport-summary');
  const title = element('div', 'jp-WorkbenchReport-title');
  append(
    title,
    element('span', 'jp-WorkbenchReport-heading', 'Quantization report'),
    element('span', 'jp-WorkbenchReport-config', summary.config)
  );
  root.appendChild(title);

  const cards = element('div', 'jp-WorkbenchReport-cards');
  const ratio = isNumber(summary.compression_ratio)
    ? `${summary.compression_ratio.toFixed(2)}\u00d7 smaller`
    : undefined;
  cards.appendChild(
    card(
      'Size',
      `${formatBytes(summary.fp32_bytes)} \u2192 ${formatBytes(summary.quantized_bytes)}`,
      ratio
    )
  );
  cards.appendChild(
    card(
      'Layers',
      `${summary.layers_quantized} quantized`,
      `${summary.layers_fp32} kept FP32`
    )
  );
  if (isNumber(summary.metric_fp32) && isNumber(summary.metric_quantized)) {
    const drop = isNumber(summary.metric_drop) ? `drop ${formatNumber(summary.metric_drop)}` : '';
    const metric = card(
      'Metric FP32 \u2192 quantized',
      `${formatNumber(summary.metric_fp32)} \u2192 ${formatNumber(summary.metric_quantized)}`,
      drop
    );
    metric.classList.add('jp-WorkbenchReport-metric');
    cards.appendChild(metric);
  } else {
    cards.appendChild(card('Metric FP32 \u2192 quantized', 'not measured', 'pass eval_fn to measure'));
  }
  cards.appendChild(
    sqnrCard(
      'Output SQNR (mean)',
      summary.mean_output_sqnr_db,
      `worst ${formatDb(summary.worst_output_sqnr_db)}`
    )
  );
  if (isNumber(summary.model_output_cosine)) {
    cards.appendChild(
      sqnrCard(
        'Model output vs FP32',
        summary.model_output_sqnr_db,
        `cosine ${summary.model_output_cosine.toFixed(5)}`
      )
    );
  }
  root.appendChild(cards);

  if (summary.worst_layers && summary.worst_layers.length) {
    const worst = element('div', 'jp-WorkbenchReport-worst');
    worst.appendChild(element('span', 'jp-WorkbenchReport-cardLabel', 'Worst layers: '));
    summary.worst_layers.forEach((name, index) => {
      if (index > 0) {
        worst.appendChild(element('span', undefined, ', '));
      }
      worst.appendChild(element('code', 'jp-WorkbenchReport-layerName', name));
    });
    root.appendChild(worst);
  }
  return root;
}
