/**
 * The report bundle as the Python side writes it (workbench/analysis/report_json.py,
 * schema: workbench/analysis/report_schema.json). Every string in it comes from the
 * user's model and must be shown as text.
 */

export const REPORT_MIME_TYPE = 'application/vnd.workbench.report+json';

export interface IReportSummary {
  config: string;
  layers_quantized: number;
  layers_fp32: number;
  /** Layers folded away (a BatchNorm into its conv): neither quantized nor kept FP32. */
  layers_folded?: number;
  fp32_bytes: number;
  quantized_bytes: number;
  compression_ratio: number;
  mean_output_sqnr_db?: number | null;
  worst_output_sqnr_db?: number | null;
  worst_layers: string[];
  model_output_sqnr_db?: number | null;
  model_output_cosine?: number | null;
  metric_fp32?: number | null;
  metric_quantized?: number | null;
  metric_drop?: number | null;
  /** What the views call the metric: the eval_fn's name. */
  metric_name?: string | null;
}

export interface ILayerRow {
  layer: string;
  type: string;
  status: 'quantized' | 'fp32';
  /** "quantized", "kept 8-bit" (held above the config's widths), "kept FP32" or "folded". */
  precision?: string | null;
  reason?: string | null;
  folded_into?: string | null;
  scheme?: string | null;
  bits?: number | null;
  weight_bits?: number | null;
  /** Input activation bits; null for an FP32 input. */
  activation_bits?: number | null;
  num_scales?: number | null;
  scale_min?: number | null;
  scale_max?: number | null;
  zero_point?: string | null;
  weight_sqnr_db?: number | null;
  layer_sqnr_db?: number | null;
  output_sqnr_db?: number | null;
  output_cosine?: number | null;
  /** SmoothQuant: where 1/s went and alpha, or why not smoothed (when it ran). */
  smoothing?: string | null;
}

export interface IStorageRow {
  layer: string;
  type?: string;
  /** "quantized", "fp32", or "" for the TOTAL row. */
  status?: string;
  fp32_bytes: number;
  weight_bytes: number;
  scale_bytes: number;
  zero_point_bytes: number;
  bias_bytes: number;
  total_bytes: number;
}

export interface IExtraTable {
  columns: string[];
  rows: unknown[][];
}

export type ReportSection = 'summary' | 'chart' | 'layers' | 'storage' | 'tables';

export const ALL_SECTIONS: ReportSection[] = ['summary', 'chart', 'layers', 'storage', 'tables'];

export interface IReportBundle {
  schema_version: number;
  /** Only these sections (the panel's tabs); all when absent. */
  sections?: ReportSection[];
  summary: IReportSummary;
  layers: ILayerRow[];
  storage: IStorageRow[];
  tables: { [title: string]: IExtraTable };
}

/** The storage table's TOTAL row is the one without a status (layers always have one). */
export function isTotalRow(row: IStorageRow): boolean {
  return !row.status;
}
