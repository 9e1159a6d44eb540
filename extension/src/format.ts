/**
 * Number formatting and the SQNR bands shared by the report views. The same rules as
 * workbench/analysis/html/format.py and sqnr_bands.py: a unit on every number, at most
 * 3 decimals, positional notation (never 1e+05), an em dash for a missing value.
 */

/** The bands of workbench/analysis/sqnr_bands.py: poor (red) below, fair (amber) between,
 *  good (green) from SQNR_GOOD_DB up. */
export const SQNR_POOR_DB = 20;
export const SQNR_GOOD_DB = 30;

export type SqnrBand = 'poor' | 'fair' | 'good';

export function sqnrBand(sqnrDb: number): SqnrBand {
  return sqnrDb < SQNR_POOR_DB ? 'poor' : sqnrDb < SQNR_GOOD_DB ? 'fair' : 'good';
}

export const MISSING = '\u2014';

export function isNumber(value: unknown): value is number {
  return typeof value === 'number' && Number.isFinite(value);
}

/** ``digits`` significant digits, at most 3 decimals from 0.1 up, positional, grouped. */
export function significant(value: number | null | undefined, digits = 3): string {
  if (!isNumber(value)) {
    return MISSING;
  }
  if (value === 0) {
    return '0';
  }
  const magnitude = Math.floor(Math.log10(Math.abs(value)));
  let decimals = Math.max(0, digits - 1 - magnitude);
  if (Math.abs(value) >= 0.1) {
    decimals = Math.min(decimals, 3);
  }
  decimals = Math.min(decimals, 20);
  const text = value.toLocaleString('en-US', {
    minimumFractionDigits: 0,
    maximumFractionDigits: decimals
  });
  return text;
}

export function formatBytes(bytes: number | null | undefined): string {
  if (!isNumber(bytes)) {
    return MISSING;
  }
  if (Math.abs(bytes) < 1024) {
    return `${bytes.toFixed(0)} B`;
  }
  if (Math.abs(bytes) < 1024 * 1024) {
    return `${significant(bytes / 1024)} KiB`;
  }
  return `${significant(bytes / (1024 * 1024))} MiB`;
}

export function formatDb(value: number | null | undefined): string {
  if (!isNumber(value)) {
    return MISSING;
  }
  const text = value.toFixed(1);
  return `${text === '-0.0' ? '0.0' : text} dB`; // no "-0.0 dB" for -0.04
}

export function formatRatio(value: number | null | undefined): string {
  return isNumber(value) ? `${value.toFixed(2)}\u00d7` : MISSING;
}

export function formatCell(value: unknown): string {
  if (value === null || value === undefined) {
    return MISSING;
  }
  if (typeof value === 'boolean') {
    return value ? 'yes' : 'no';
  }
  if (typeof value === 'number') {
    if (!Number.isFinite(value)) {
      return MISSING;
    }
    return Number.isInteger(value) ? value.toLocaleString('en-US') : significant(value, 4);
  }
  return String(value);
}

/** The start and, longer, the end of a long name (workbench/analysis/html/elements.py):
 *  ``feature_extractor.stages.3.0.second_convolution`` -> ``feature_e…3.0.second_convolution``. */
export function shortenMiddle(name: string, maxChars = 40): string {
  if (name.length <= maxChars) {
    return name;
  }
  const head = Math.max(7, Math.floor(maxChars / 4));
  const tail = maxChars - 1 - head;
  return `${name.slice(0, head)}\u2026${name.slice(name.length - tail)}`;
}
