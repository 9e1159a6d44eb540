/** The report's summary header: sizes, layers, the named metric, SQNR, the poor layers. */

import { append, element } from './dom';
import {
  formatBytes,
  formatDb,
  formatRatio,
  isNumber,
  significant,
  SQNR_GOOD_DB,
  sqnrBand
} from './format';
import { ILayerRow, IReportSummary } from './report';

const WORST_LISTED = 5;

function card(label: string, value: string, detail?: string, band?: string): HTMLElement {
  const node = element('div', `jp-WorkbenchReport-card${band ? ` jp-mod-${band}` : ''}`);
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

function bandOf(value: number | null | undefined): string | undefined {
  return isNumber(value) ? sqnrBand(value) : undefined;
}

/** Quantized layers below the good band, worst first. */
export function poorLayers(layers: ILayerRow[]): ILayerRow[] {
  return layers
    .filter(
      row =>
        row.status === 'quantized' &&
        isNumber(row.output_sqnr_db) &&
        row.output_sqnr_db < SQNR_GOOD_DB
    )
    .sort((a, b) => (a.output_sqnr_db as number) - (b.output_sqnr_db as number));
}

export function renderSummary(summary: IReportSummary, layers: ILayerRow[]): HTMLElement {
  const root = element('div', 'jp-WorkbenchReport-summary');
  const title = element('div', 'jp-WorkbenchReport-title');
  append(
    title,
    element('span', 'jp-WorkbenchReport-heading', 'Quantization report'),
    element('span', 'jp-WorkbenchReport-config', summary.config)
  );
  root.appendChild(title);

  const cards = element('div', 'jp-WorkbenchReport-cards');
  cards.appendChild(
    card(
      'Size FP32 \u2192 quantized',
      `${formatBytes(summary.fp32_bytes)} \u2192 ${formatBytes(summary.quantized_bytes)}`,
      `${formatRatio(summary.compression_ratio)} smaller`
    )
  );
  cards.appendChild(
    card(
      'Layers',
      `${summary.layers_quantized} quantized`,
      summary.layers_folded
        ? `${summary.layers_folded} folded, ${summary.layers_fp32} kept FP32`
        : `${summary.layers_fp32} kept FP32`
    )
  );
  if (isNumber(summary.metric_fp32) && isNumber(summary.metric_quantized)) {
    const name = summary.metric_name ? `${summary.metric_name} (eval_fn)` : 'eval_fn metric';
    const drop = summary.metric_fp32 - summary.metric_quantized;
    const metric = card(
      `${name}: FP32 \u2192 quantized`,
      `${significant(summary.metric_fp32, 4)} \u2192 ${significant(summary.metric_quantized, 4)}`,
      `${drop >= 0 ? 'drop' : 'gain'} ${significant(Math.abs(drop))} (in the metric's own unit)`
    );
    metric.classList.add('jp-WorkbenchReport-metric');
    cards.appendChild(metric);
  } else {
    cards.appendChild(card('Metric', 'not measured', 'pass eval_fn(model) -> float'));
  }
  cards.appendChild(
    card(
      'Layer output SQNR vs FP32',
      `mean ${formatDb(summary.mean_output_sqnr_db)}`,
      `worst ${formatDb(summary.worst_output_sqnr_db)}`,
      bandOf(summary.mean_output_sqnr_db)
    )
  );
  if (isNumber(summary.model_output_sqnr_db)) {
    cards.appendChild(
      card(
        'Model output SQNR vs FP32',
        formatDb(summary.model_output_sqnr_db),
        isNumber(summary.model_output_cosine)
          ? `cosine ${summary.model_output_cosine.toFixed(3)}`
          : undefined,
        bandOf(summary.model_output_sqnr_db)
      )
    );
  }
  root.appendChild(cards);

  const poor = poorLayers(layers);
  if (poor.length) {
    const worst = element('div', 'jp-WorkbenchReport-worst');
    worst.appendChild(
      element('span', 'jp-WorkbenchReport-cardLabel', `Layers below ${SQNR_GOOD_DB} dB: `)
    );
    poor.slice(0, WORST_LISTED).forEach((row, index) => {
      if (index > 0) {
        worst.appendChild(element('span', undefined, ', '));
      }
      worst.appendChild(element('code', 'jp-WorkbenchReport-layerName', row.layer));
      worst.appendChild(element('span', undefined, ` ${formatDb(row.output_sqnr_db)}`));
    });
    if (poor.length > WORST_LISTED) {
      worst.appendChild(element('span', undefined, ` and ${poor.length - WORST_LISTED} more`));
    }
    root.appendChild(worst);
  }
  return root;
}
